"""Training internals of the toy models that the shipped weights depend on."""

import torch
import torch.nn.functional as F

from diffscrub.toy import recipes as R
from diffscrub.toy.short_t5 import KeyBias, compress_t5_ids, patch_for_short_t5, unpatch_short_t5
from diffscrub.toy.train import sd3_text_embeds, tokenize


def test_short_t5_training_path_equals_pipeline_padding():
    """toy-mmdit trains on a short T5 sequence with a <pad> multiplicity bias; that must give
    the same transformer output as the 256-token padding StableDiffusion3Pipeline uses."""
    torch.manual_seed(0)
    tok, t5tok = R.build_clip_tokenizer(), R.build_t5_tokenizer()
    c1, c2, t5, tr = R.build_mmdit_clip(tok), R.build_mmdit_clip(tok), R.build_mmdit_t5(t5tok), R.build_transformer()
    with torch.no_grad():
        for p in list(tr.parameters()) + list(t5.parameters()):
            if p.ndim > 1 and p is not t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight:
                p.add_(torch.randn_like(p) * 0.05)
    caps = ["7 and 3 and 1 on grass", "2 on flat", ""]
    ids1, full = tokenize(tok, caps, R.TOKEN_LENGTH), tokenize(t5tok, caps, R.T5_SEQUENCE_LENGTH)
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        pe, pool = sd3_text_embeds(c1, c2, t5, ids1, ids1, full)
        ref = tr(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pool, timestep=t).sample
        short, logw = compress_t5_ids(full, t5tok.pad_token_id)
        holder = KeyBias()
        holder.t5 = logw[:, None, None, :]
        holder.joint = F.pad(logw, (64 + ids1.shape[1], 0))[:, None, None, :]
        patch_for_short_t5(t5, tr, holder)
        pe2, pool2 = sd3_text_embeds(c1, c2, t5, ids1, ids1, short)
        out = tr(hidden_states=x, encoder_hidden_states=pe2, pooled_projections=pool2, timestep=t).sample
        unpatch_short_t5(t5, tr)
        again = tr(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pool, timestep=t).sample
    assert short.shape[1] < 16
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert torch.equal(again, ref)
    assert "compute_bias" not in vars(t5.encoder.block[0].layer[0].SelfAttention)


def test_pipeline_prompt_encoding_matches_training():
    """The embeddings training feeds the denoisers are the ones the pipelines compute."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from diffscrub.toy.train import unet_text_embeds

    torch.manual_seed(0)
    tok, t5tok = R.build_clip_tokenizer(), R.build_t5_tokenizer()
    vae = R.build_vae()
    te, unet = R.build_unet_text_encoder(tok), R.build_unet()
    sd = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=R.build_unet_sampler(),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    caps = ["4 and 9 on brick", ""]
    with torch.no_grad():
        pe, _ = sd.encode_prompt(caps, "cpu", 1, False)
        assert torch.allclose(pe, unet_text_embeds(te, tokenize(tok, caps, R.TOKEN_LENGTH)), atol=1e-6)

    c1, c2, t5, tr = R.build_mmdit_clip(tok), R.build_mmdit_clip(tok), R.build_mmdit_t5(t5tok), R.build_transformer()
    sd3 = StableDiffusion3Pipeline(transformer=tr, scheduler=R.build_flow_scheduler(), vae=vae, text_encoder=c1,
                                   tokenizer=tok, text_encoder_2=c2, tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=t5tok)
    with torch.no_grad():
        pe, _, pooled, _ = sd3.encode_prompt(caps, caps, caps, device="cpu", do_classifier_free_guidance=False)
        ids1 = tokenize(tok, caps, R.TOKEN_LENGTH)
        pe_t, pooled_t = sd3_text_embeds(c1, c2, t5, ids1, ids1, tokenize(t5tok, caps, R.T5_SEQUENCE_LENGTH))
    assert torch.allclose(pe, pe_t, atol=1e-6) and torch.allclose(pooled, pooled_t, atol=1e-6)


def test_training_set_is_the_same_for_any_worker_count():
    """Chunks are seeded by (seed, chunk index): one process and two give the same canvases."""
    import numpy as np

    from diffscrub.toy.train import make_training_set

    a_img, a_cap = make_training_set(10, seed=3, exclude="7", chunk=4, workers=1)
    b_img, b_cap = make_training_set(10, seed=3, exclude="7", chunk=4, workers=2)
    c_img, _ = make_training_set(10, seed=4, exclude="7", chunk=4, workers=1)
    assert a_img.shape == (10, 32, 32, 3) and len(a_cap) == 10
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)
    assert not any("7" in c.split() for c in a_cap)
