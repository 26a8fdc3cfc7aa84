"""Tests of the tiny test pipelines (tests/tiny_pipelines.py) and the local tokenizers."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoTokenizer, CLIPTokenizer, T5Tokenizer

from diffscrub.toy.tokenizers import DEFAULT_WORDS, build_clip_tokenizer, build_t5_tokenizer

try:
    from tiny_pipelines import (
        DIGIT_LABELS,
        FAMILIES,
        IMAGE_SIZE,
        LATENT_SIZE,
        MAX_LENGTH,
        PIPELINE_CLASSES,
        build_tiny_pipeline,
        sample_kwargs,
    )
except ImportError:  # tests/ imported as a package
    from tests.tiny_pipelines import (
        DIGIT_LABELS,
        FAMILIES,
        IMAGE_SIZE,
        LATENT_SIZE,
        MAX_LENGTH,
        PIPELINE_CLASSES,
        build_tiny_pipeline,
        sample_kwargs,
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are so small that thread start-up and spinning cost far more
    # than they save; on a shared 2-core machine two threads made a UNet call
    # 50x slower.  Restore the caller's setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for cname, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, value in component.state_dict().items():
                out[f"{cname}.{key}"] = value
    return out


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


# ---------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_builds_fast_with_real_class(name):
    start = time.perf_counter()
    pipe = build_tiny_pipeline(name)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{name} took {elapsed:.2f}s to build"
    assert type(pipe) is PIPELINE_CLASSES[name]
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in component.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_weights(name):
    a, b = build_tiny_pipeline(name, seed=0), build_tiny_pipeline(name, seed=0)
    _assert_same_state(_state(a), _state(b))
    c = build_tiny_pipeline(name, seed=1)
    den_a, den_c = _denoiser(a).state_dict(), _denoiser(c).state_dict()
    assert any(not torch.equal(den_a[k], den_c[k]) for k in den_a)


def test_seed_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("dit", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_pipeline("sd4")


@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_reload(name, tiny_pipeline_dirs):
    folder = tiny_pipeline_dirs(name)
    assert tiny_pipeline_dirs(name) == folder  # cached for the session
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[name].__name__
    weights = list(folder.glob("*/*.safetensors"))
    assert weights and not list(folder.glob("*/*.bin"))

    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(loaded) is PIPELINE_CLASSES[name]
    _assert_same_state(_state(loaded), _state(build_tiny_pipeline(name)))
    for key in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if key in index:
            assert index[key][1] in ("CLIPTokenizer", "T5Tokenizer")
            assert getattr(loaded, key).model_max_length == MAX_LENGTH
    if name == "dit":
        assert loaded.get_label_ids(["seven"]) == [DIGIT_LABELS.index("seven")]


@pytest.mark.parametrize("name", FAMILIES)
def test_samples_32px_image(name, tiny_pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dirs(name), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(**sample_kwargs(name)).images
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    again = pipe(**sample_kwargs(name)).images
    np.testing.assert_array_equal(image, again)


@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_and_conditioning(name):
    pipe = build_tiny_pipeline(name)
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).latent_dist.mean
    assert latents.shape == (1, vae.config.latent_channels, LATENT_SIZE, LATENT_SIZE)
    den = _denoiser(pipe)
    if name in ("sd3", "flux"):
        assert vae.config.shift_factor not in (None, 0)
    else:
        assert vae.config.shift_factor is None
    if name in ("dit", "pixart"):  # learned sigma
        assert den.config.out_channels == 2 * den.config.in_channels
    if name == "flux":
        assert den.config.in_channels == 4 * vae.config.latent_channels
        assert sum(den.config.axes_dims_rope) == den.config.attention_head_dim
        assert den.config.guidance_embeds
    else:
        assert den.config.in_channels == vae.config.latent_channels
    if hasattr(den, "transformer_blocks"):
        assert len(den.transformer_blocks) % 2 == 0
    if name in ("sd", "sd-v", "sdxl"):
        expected = "v_prediction" if name == "sd-v" else "epsilon"
        assert pipe.scheduler.config.prediction_type == expected
        grid = LATENT_SIZE // 2 ** (len(den.config.block_out_channels) - 1)
        assert grid >= 4
    if name == "sdxl":
        te2 = pipe.text_encoder_2
        cfg = den.config
        assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.config.projection_dim
        assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + te2.config.hidden_size


def test_unet_mid_block_grid():
    pipe = build_tiny_pipeline("sd")
    seen = {}

    def hook(module, args, output):
        seen["out"] = output

    handle = pipe.unet.mid_block.register_forward_hook(hook)
    with torch.no_grad():
        pipe.unet(torch.zeros(1, 4, LATENT_SIZE, LATENT_SIZE), 10, torch.zeros(1, MAX_LENGTH, 32))
    handle.remove()
    assert seen["out"].shape == (1, 64, 8, 8)


# ---------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------


def test_clip_tokenizer_words_and_padding():
    tok = build_clip_tokenizer(max_length=12)
    assert isinstance(tok, CLIPTokenizer)
    assert tok.model_max_length == 12
    assert len(tok) < 600
    for word in DEFAULT_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    enc = tok("a photo of seven", padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 12
    assert ids[0] == tok.bos_token_id and ids[5] == tok.eos_token_id
    assert ids[6:] == [tok.pad_token_id] * 6
    assert enc.attention_mask == [1] * 6 + [0] * 6


def test_clip_tokenizer_unknown_text():
    tok = build_clip_tokenizer(words=["tabby"])
    assert len(tok("tabby", add_special_tokens=False).input_ids) == 1
    text = "Zebra-crossing, x7 ünïcode 日本 🙂!!"
    ids = tok(text).input_ids
    assert len(ids) > 5 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(tok("zebra crossing").input_ids, skip_special_tokens=True) == "zebra crossing"
    long = tok(" ".join(["word"] * 50), padding="max_length", truncation=True, max_length=tok.model_max_length)
    assert len(long.input_ids) == tok.model_max_length and long.input_ids[-1] == tok.eos_token_id


def test_t5_tokenizer_pipeline_call():
    tok = build_t5_tokenizer(max_length=16)
    assert isinstance(tok, T5Tokenizer)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) < 600
    for word in DEFAULT_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    # the call PixArt / SD3 / Flux make
    enc = tok(
        ["a photo of seven", "Qwerty zebra ünï 日本"],
        padding="max_length",
        max_length=10,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert enc.input_ids.shape == (2, 10) and enc.attention_mask.shape == (2, 10)
    assert enc.input_ids[0, :5].tolist()[-1] == tok.eos_token_id
    assert enc.attention_mask[0].tolist() == [1] * 5 + [0] * 5
    assert enc.input_ids[0, 5:].eq(tok.pad_token_id).all()
    assert tok.decode(tok("qwerty zebra").input_ids, skip_special_tokens=True) == "qwerty zebra"


@pytest.mark.parametrize("build", [build_clip_tokenizer, build_t5_tokenizer])
def test_tokenizer_round_trip(build, tmp_path):
    tok = build(words=["tabby"], max_length=16)
    tok.save_pretrained(tmp_path)
    for loader in (type(tok), AutoTokenizer):
        again = loader.from_pretrained(tmp_path, local_files_only=True)
        assert type(again) is type(tok)
        assert again.model_max_length == 16
        assert again.get_vocab() == tok.get_vocab()
        for text in ("a tabby on gravel", "Unheard-of words 123"):
            assert again(text).input_ids == tok(text).input_ids
        assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_tokenizers_are_deterministic():
    assert build_clip_tokenizer().get_vocab() == build_clip_tokenizer().get_vocab()
    assert build_t5_tokenizer().get_vocab() == build_t5_tokenizer().get_vocab()
