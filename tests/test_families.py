"""The Teacher–Student Scrubber on a tiny model of every denoiser family.

Each family runs Phase 1 and a few Phase 2 steps through the library entry point, then the
invariants are checked: finite loss, teacher bit-identical, only the selected parameters
moved, masks of latent shape in [0, 1], image-token features, and a reloadable output.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from diffscrub.adapters import adapter_for
from diffscrub.config import EraseConfig
from diffscrub.core.trainer import erase
from tiny_pipelines import FAMILIES, build_tiny_pipeline

EXPECTED_FAMILY = {"sd": "sd", "sd-v": "sd", "sdxl": "sdxl", "dit": "dit", "pixart": "pixart", "sd3": "sd3",
                   "flux": "flux"}
TSS_FAST = {"num_prototypes": 3, "vectors_per_image": 32, "fit_draws": 1, "mask_draws": 1, "contrast_samples": 4,
            "contrast_sample_steps": 2}


@pytest.fixture(scope="module")
def forget_dir(tmp_path_factory):
    """Six 32x32 canvases: a bright square on a textured background, at varying places."""
    folder = tmp_path_factory.mktemp("forget")
    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
        y, x = rng.integers(0, 20, 2)
        img[y:y + 12, x:x + 12] = [230, 40, 40]
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def run_erase(name, forget_dir, out, trainable="full", **extra):
    pipe = build_tiny_pipeline(name)
    cfg = EraseConfig(model=name, forget=str(forget_dir), out=str(out), steps=2, batch_size=3, quiet=True,
                      device="cpu", trainable=trainable, lora_rank=2 if trainable == "lora" else 0, seed=0,
                      inversion_steps=2, **extra)
    before = {k: v.detach().clone() for k, v in adapter_for(pipe).denoiser.state_dict().items()}
    result = erase(cfg, dict(TSS_FAST), pipe=pipe, log=lambda m: None)
    return pipe, before, result


@pytest.mark.parametrize("name", FAMILIES)
def test_family_end_to_end(name, forget_dir, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    pipe, before, result = run_erase(name, forget_dir, tmp_path / "out", trainable="attention")
    record = result.record
    assert record["family"] == EXPECTED_FAMILY[name]
    assert all(np.isfinite(row["total"]) for row in record["losses"])

    # Only attention parameters moved; at least one did.
    adapter = adapter_for(pipe)
    attn = set(adapter.attention_parameters(adapter.denoiser))
    after = adapter.denoiser.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "no parameter changed"
    assert changed <= attn, f"non-attention parameters changed: {sorted(changed - attn)[:3]}"

    # Prototypes: unit norm; masks: latent shape, values in [0, 1].
    artifacts = load_file(str(tmp_path / "out" / "diffscrub_artifacts.safetensors"))
    protos, every = artifacts["prototypes"], artifacts["all_prototypes"]
    assert every.shape[0] == TSS_FAST["num_prototypes"]
    kept = artifacts["prototype_kept"].bool()
    assert 1 <= protos.shape[0] == int(kept.sum())
    assert torch.equal(protos, every[kept])
    assert torch.allclose(protos.norm(dim=-1), torch.ones(len(protos)), atol=1e-5)
    assert record["prepare"]["prototypes_kept"] == protos.shape[0]

    # Textual inversion grew the pool (text families) and left the saved tokenizers/encoders as they were.
    pool = record["conditioning"]["pool"]
    if name == "dit":
        assert pool == [""]
    else:
        words = record["conditioning"]["nearest_words"]  # the first is the name; the rest kept as they are
        assert pool == [""] + words[:1] + ["<concept>"] + words[1:]
    masks = artifacts["forget_masks"]
    assert tuple(masks.shape) == (6, 1, *record["latent_shape"][1:])
    assert masks.min() >= 0 and masks.max() <= 1

    # The saved folder reloads with plain diffusers and samples.
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert type(reloaded).__name__ == type(pipe).__name__
    original = build_tiny_pipeline(name)
    for tok_name, enc_name in adapter.text_encoder_pairs:
        assert len(getattr(reloaded, tok_name)) == len(getattr(original, tok_name))
        assert "<concept>" not in getattr(reloaded, tok_name).get_vocab()
        for key, value in getattr(original, enc_name).state_dict().items():
            assert torch.equal(value, getattr(reloaded, enc_name).state_dict()[key]), (enc_name, key)
    reloaded_denoiser = adapter_for(reloaded).denoiser
    for key, value in reloaded_denoiser.state_dict().items():
        assert torch.equal(value, after[key]), key
    kwargs = {"class_labels": [1]} if name == "dit" else {"prompt": "a 7"}
    if name == "flux":
        kwargs["max_sequence_length"] = 16
    if name == "pixart":
        kwargs["use_resolution_binning"] = False  # binning tables exist only for 256-1024 px models
    image = reloaded(**kwargs, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                     **({"height": 32, "width": 32} if name != "dit" else {})).images
    assert image.shape[-3:] == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_full_finetune_keeps_teacher(name, forget_dir, tmp_path, monkeypatch):
    """The frozen teacher copy is bit-identical to the original weights after training."""
    captured = {}
    real_deepcopy = copy.deepcopy

    def spy(obj, *a, **k):
        out = real_deepcopy(obj, *a, **k)
        if isinstance(obj, torch.nn.Module):
            captured["teacher"] = out
        return out

    monkeypatch.setattr("diffscrub.core.trainer.copy.deepcopy", spy)
    pipe, before, _ = run_erase(name, forget_dir, tmp_path / "out", trainable="full")
    teacher = captured["teacher"]
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(p.requires_grad for p in teacher.parameters())
    student = adapter_for(pipe).denoiser.state_dict()
    assert any(not torch.equal(before[k], student[k]) for k in before)


@pytest.mark.parametrize("name,expected", [("sd", ("attn2.to_k.", "attn2.to_v.")),
                                           ("sd3", ("attn.add_k_proj.", "attn.add_v_proj.")),
                                           ("flux", ("attn.add_k_proj.", "attn.add_v_proj."))])
def test_text_kv_trains_only_the_text_keys_and_values(name, expected, forget_dir, tmp_path):
    """--trainable text-kv: what moved is a subset of the text's key/value projections, and each of
    those projection kinds moved somewhere (so the set is neither empty nor the image side)."""
    pipe, before, result = run_erase(name, forget_dir, tmp_path / "out", trainable="text-kv")
    assert result.record["trainable"] == "text-kv"
    adapter = adapter_for(pipe)
    kv = set(adapter.attention_parameters(adapter.denoiser, text_kv_only=True))
    assert kv and all(any(e in k for e in expected) for k in kv), sorted(kv)[:3]
    assert kv < set(adapter.attention_parameters(adapter.denoiser, cross_only=True))
    after = adapter.denoiser.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= kv, f"parameters outside the text keys/values moved: {sorted(changed - kv)[:3]}"
    assert all(any(e in k for k in changed) for e in expected), sorted(changed)[:4]


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_lora_teacher_is_base_and_weights_load(name, forget_dir, tmp_path):
    """With LoRA there is no teacher copy; the saved LoRA reproduces the merged output."""
    from diffusers import DiffusionPipeline

    pipe, before, result = run_erase(name, forget_dir, tmp_path / "out", trainable="lora")
    assert result.record["trainable"] == "lora"
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    merged = adapter_for(DiffusionPipeline.from_pretrained(str(tmp_path / "out"))).denoiser
    # Base weights of every non-LoRA module are the original ones.
    lora_targets = {"to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    for key, value in merged.state_dict().items():
        if not any(f".{t}." in f".{key}" for t in lora_targets):
            assert torch.equal(value, before[key]), key
    # Loading the LoRA file onto a fresh original reproduces the merged model's prediction.
    fresh = build_tiny_pipeline(name)
    fresh.load_lora_weights(str(tmp_path / "out"))
    adapter = adapter_for(fresh)
    z = torch.randn(1, *result.record["latent_shape"], generator=torch.Generator().manual_seed(1))
    cond = adapter.encode_prompts([""], (32, 32)).take(torch.zeros(1, dtype=torch.long))
    t = torch.tensor([500])
    with torch.no_grad():
        a = adapter.call(adapter.denoiser, z, t, cond)
        b = adapter.call(merged, z, t, cond)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert result.record["trainable_parameters"] < sum(p.numel() for p in merged.parameters()) / 5


@pytest.mark.parametrize("name", FAMILIES)
def test_features_are_image_tokens(name):
    """The tap yields [B, N_img, D] image tokens; for joint-attention blocks, the image stream."""
    pipe = build_tiny_pipeline(name)
    adapter = adapter_for(pipe)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt = "seven" if name == "dit" else "a 7 on grass"
    cond = adapter.encode_prompts(["", prompt], (32, 32)).take(torch.tensor([0, 1]))
    raw = []
    handle = adapter.tap_module(adapter.denoiser).register_forward_hook(lambda m, i, o: raw.append(o))
    with torch.no_grad():
        pred, feats = adapter.predict(adapter.denoiser, z, torch.tensor([400, 400]), cond, features=True)
    handle.remove()
    hf, wf = feats.grid
    assert feats.vectors.shape[:2] == (2, hf * wf)
    assert pred.shape[0] == 2 and pred.shape[-2:] == z.shape[-2:]
    out = raw[-1]
    if isinstance(out, tuple):  # joint block: (text, image). The image stream must be the one tapped.
        text, image = out
        assert text is not None, "tapped a block that has no text stream: not a joint block"
        assert text.shape[1] != image.shape[1], "test needs distinct stream lengths"
        assert torch.equal(feats.vectors, image)


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_conditioning_is_what_the_pipeline_samples_with(name):
    """The T5 sequence is padded to the pipeline's default length, not the tokenizer's: a user sampling with
    ``pipe(prompt)`` gets that sequence, and its ``<pad>`` keys weigh in the joint attention, so a student
    trained on a shorter one learns a conditioning it is never sampled with. (The tiny tokenizers say 16.)"""
    pipe = build_tiny_pipeline(name)
    adapter = adapter_for(pipe)
    prompts = ["a 7", ""]
    cond = adapter.encode_prompts(prompts, (32, 32)).kwargs
    with torch.no_grad():
        if name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                      do_classifier_free_guidance=False)
        elif name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None)
        else:
            embeds, _, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False)
            pooled = None
    default = {"sd3": 16 + 256, "flux": 512, "pixart": 120}[name]  # CLIP's 16 then T5's 256 on SD3
    assert embeds.shape[1] == default
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds.float())
    if pooled is not None:
        torch.testing.assert_close(cond["pooled_projections"], pooled.float())
    # a custom pipeline class whose __call__ gives no default: the family's diffusers pipeline's length
    pipe.__class__ = type("Custom", (type(pipe),), {"__call__": lambda self, prompt=None, **kw: None})
    assert adapter.text_length() == default - (16 if name == "sd3" else 0)


def test_unknown_family_error():
    from diffscrub.errors import ConfigError, UnknownFamilyError

    class Strange:
        pass

    with pytest.raises(UnknownFamilyError, match="--family with one of"):
        adapter_for(Strange())
    with pytest.raises(ConfigError, match="unknown family 'unet9'"):
        adapter_for(build_tiny_pipeline("sd"), "unet9")


@pytest.mark.parametrize("name,trainable", [("sd", "full"), ("sd3", "lora")])
def test_bf16_mixed_precision(name, trainable, forget_dir, tmp_path):
    """--mixed-precision bf16: teacher and frozen parts in bf16, trainable weights fp32 and moving,
    losses finite, the output saved in bf16 and loadable; fp16 on the CPU is refused."""
    from diffusers import DiffusionPipeline

    from diffscrub.core.trainer import setup_run
    from diffscrub.errors import ConfigError

    pipe = build_tiny_pipeline(name)
    cfg = EraseConfig(model=name, forget=str(forget_dir), out=str(tmp_path / "setup"), steps=1, batch_size=3,
                      quiet=True, device="cpu", trainable=trainable, lora_rank=2 if trainable == "lora" else 0,
                      mixed_precision="bf16", seed=0, conditioning="null")
    run = setup_run(cfg, dict(TSS_FAST), pipe=pipe, log=lambda m: None)
    teacher = run.ctx.teacher if run.ctx.teacher is not None else run.ctx.student
    frozen = [p for p in teacher.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert run.params and all(p.dtype == torch.float32 for p in run.params)
    assert all(p.dtype == torch.bfloat16 for m in run.adapter.frozen_modules() for p in m.parameters())

    pipe, before, result = run_erase(name, forget_dir, tmp_path / "out", trainable=trainable, mixed_precision="bf16",
                                     conditioning="null")
    assert all(np.isfinite(row["total"]) for row in result.record["losses"])
    assert result.record["mixed_precision"] == "bf16"
    from safetensors.torch import load_file

    denoiser_attr = adapter_for(pipe).denoiser_attr
    stored = {}
    for f in (tmp_path / "out" / denoiser_attr).glob("*.safetensors"):
        stored.update(load_file(str(f)))
    assert stored and {v.dtype for v in stored.values()} == {torch.bfloat16}
    moved = [k for k, v in stored.items() if k in before and not torch.equal(v, before[k].to(torch.bfloat16))]
    assert moved, "the bf16 run changed nothing"
    DiffusionPipeline.from_pretrained(str(tmp_path / "out"))  # loads as a plain pipeline

    with pytest.raises(ConfigError, match="fp16"):
        setup_run(EraseConfig(model=name, forget=str(forget_dir), out=str(tmp_path / "fp16"), steps=1, quiet=True,
                              device="cpu", mixed_precision="fp16"), dict(TSS_FAST), pipe=build_tiny_pipeline(name),
                  log=lambda m: None)
