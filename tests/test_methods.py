"""The baseline methods (esd, attention, vdu, sfd) on the tiny pipelines, and their building blocks.

A method x family matrix runs two steps of every method that applies to a family through
``erase`` and checks the invariants (finite losses, only the selected parameters moved, frozen
teacher bit-identical) or the refusal (attention on DiT). Unit tests pin the attention capture
(probabilities, identical hidden states, gradients), the concept token positions, the ESD target,
the few-step sampler, the VDU precision/regulariser/bound and the attention losses.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffscrub.adapters import adapter_for
from diffscrub.adapters.attention_maps import (
    AttentionRecorder,
    capture_text_attention,
    concept_token_positions,
    text_attention_modules,
)
from diffscrub.adapters.base import Conditioning, DenoiserAdapter
from diffscrub.config import EraseConfig
from diffscrub.core.trainer import erase
from diffscrub.errors import ConfigError
from diffscrub.schedules import DDPMSchedule, FlowSchedule
from tiny_pipelines import FAMILIES, build_tiny_pipeline

METHODS = ("esd", "attention", "vdu", "sfd")
TEXT_FAMILIES = tuple(f for f in FAMILIES if f != "dit")
#: options that keep each method to a few tiny passes per step.
FAST = {
    "esd": {"generate_steps": 2},
    "attention": {},
    "vdu": {"fisher_batches": 1, "baseline_batches": 1},
    "sfd": {"sample_steps": 2},
}


@functools.cache
def _pipeline(name):
    return build_tiny_pipeline(name)


def fresh_pipeline(name):
    """A private copy of the family's tiny pipeline (built once per session)."""
    return copy.deepcopy(_pipeline(name))


def concept_for(name):
    return "seven" if name == "dit" else "a 7"


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    """Three forget and three retain 32x32 images."""
    out = {}
    for kind, seed in (("forget", 0), ("retain", 1)):
        folder = tmp_path_factory.mktemp(kind)
        rng = np.random.default_rng(seed)
        for i in range(3):
            img = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            y, x = rng.integers(0, 20, 2)
            img[y:y + 12, x:x + 12] = [230, 40, 40] if kind == "forget" else [40, 40, 230]
            Image.fromarray(img).save(folder / f"{i}.png")
        out[kind] = folder
    return out


def run_method(method, name, image_dirs, out, monkeypatch, options=None, **extra):
    """Two erase steps; returns (pipe, weights before, teacher copy, result)."""
    pipe = fresh_pipeline(name)
    denoiser = adapter_for(pipe).denoiser
    before = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
    captured = {}
    real_deepcopy = copy.deepcopy

    def spy(obj, *a, **k):
        result = real_deepcopy(obj, *a, **k)
        if isinstance(obj, type(denoiser)) and "teacher" not in captured:
            captured["teacher"] = result
        return result

    monkeypatch.setattr("diffscrub.core.trainer.copy.deepcopy", spy)
    kwargs = {"model": name, "forget": str(image_dirs["forget"]), "out": str(out), "method": method, "steps": 2,
              "batch_size": 2, "quiet": True, "device": "cpu", "seed": 0, "conditioning": "null"}
    kwargs.update(extra)
    result = erase(EraseConfig(**kwargs), {**FAST[method], **(options or {})}, pipe=pipe, log=lambda m: None)
    return pipe, before, captured.get("teacher"), result


def changed_params(pipe, before):
    after = adapter_for(pipe).denoiser.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_on_family(method, name, image_dirs, tmp_path, monkeypatch):
    extra = {}
    if method in ("esd", "attention", "sfd"):
        extra["concept_prompt"] = concept_for(name)
    if method == "vdu":
        extra["retain"] = str(image_dirs["retain"])
    if method == "attention" and name == "dit":
        # Trained on everything so the refusal comes from the method, not from the empty trainable set.
        with pytest.raises(ConfigError, match="class-conditional with no text"):
            run_method(method, name, image_dirs, tmp_path / "out", monkeypatch, trainable="full", **extra)
        return
    if method == "esd" and name == "dit":
        extra["trainable"] = "full"  # ESD-u: DiT has no text-to-image attention

    pipe, before, teacher, result = run_method(method, name, image_dirs, tmp_path / "out", monkeypatch, **extra)
    record = result.record
    assert len(record["losses"]) == 2 and all(np.isfinite(row["total"]) for row in record["losses"])

    adapter = adapter_for(pipe)
    changed = changed_params(pipe, before)
    assert changed, "no parameter moved"
    if method in ("esd", "attention") and name != "dit":
        assert record["trainable"] == "cross-attention"  # the method's default trainable set
        cross = set(adapter.attention_parameters(adapter.denoiser, cross_only=True))
        assert changed <= cross, f"non-cross-attention parameters moved: {sorted(changed - cross)[:3]}"

    assert teacher is not None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_attention_skip_outer_freezes_outer_blocks(image_dirs, tmp_path, monkeypatch):
    pipe, before, _, result = run_method("attention", "sd", image_dirs, tmp_path / "out", monkeypatch,
                                         {"skip_outer": True, "attention_loss": "resteer"}, concept_prompt="a 7")
    names = [n for n, _, _ in text_attention_modules(adapter_for(pipe).denoiser)]
    changed = changed_params(pipe, before)
    assert changed and not any(k.startswith((f"{names[0]}.", f"{names[-1]}.")) for k in changed)
    assert any(k.startswith(f"{names[1]}.") for k in changed)
    assert result.record["prepare"]["steered_blocks"] == len(names) - 2


@pytest.mark.parametrize("name,options", [
    ("sd3", {"attention_loss": "random", "recon": "distill"}),
    ("flux", {"attention_loss": "resteer"}),
])
def test_attention_variants_with_retain_and_lora(name, options, image_dirs, tmp_path, monkeypatch):
    """Random/resteer losses, distillation, retain images; with LoRA the teacher is the base model."""
    lora = name == "flux"
    _, _, _, result = run_method("attention", name, image_dirs, tmp_path / "out", monkeypatch, options,
                                 concept_prompt="a 7", retain=str(image_dirs["retain"]),
                                 **({"trainable": "lora", "lora_rank": 2} if lora else {}))
    rows = result.record["losses"]
    assert all(np.isfinite(r["attention"]) and np.isfinite(r["recon"]) for r in rows)


def test_esd_from_forget_images_and_vdu_lora(image_dirs, tmp_path, monkeypatch):
    pipe, before, _, result = run_method("esd", "sd-v", image_dirs, tmp_path / "a", monkeypatch,
                                         {"source": "forget", "eta": 2.0}, concept_prompt="a 7")
    assert changed_params(pipe, before) and np.isfinite(result.record["losses"][-1]["total"])
    monkeypatch.undo()
    _, _, _, result = run_method("vdu", "sd", image_dirs, tmp_path / "b", monkeypatch, None,
                                 retain=str(image_dirs["retain"]), trainable="lora", lora_rank=2)
    assert result.record["prepare"]["precision_source"] == "fisher"
    assert np.isfinite(result.record["losses"][-1]["stability"])


# ----------------------------------------------------------------------------- missing inputs
@pytest.mark.parametrize("method", ["esd", "attention", "sfd"])
def test_missing_concept_prompt(method, image_dirs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--concept-prompt"):
        run_method(method, "sd3", image_dirs, tmp_path / "out", monkeypatch)


def test_vdu_needs_retain_or_checkpoints(image_dirs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"vdu needs --retain DIR or --vdu-checkpoints"):
        run_method("vdu", "dit", image_dirs, tmp_path / "out", monkeypatch)


@pytest.mark.parametrize("method,values,match", [
    ("esd", {"source": "dream"}, "esd.source"),
    ("esd", {"eta": -1}, "esd.eta"),
    ("attention", {"attention_loss": "forget"}, "attention.attention_loss"),
    ("attention", {"t_high": 0}, "attention.t_high"),
    ("vdu", {"cap": 0}, "vdu.cap"),
    ("vdu", {"checkpoints": ["one.safetensors"]}, "vdu.checkpoints"),
    ("vdu", {"prior_mean": "checkpoints"}, "vdu.checkpoints"),
    ("sfd", {"sample_steps": 0}, "sfd.sample_steps"),
])
def test_config_validation(method, values, match):
    from diffscrub.config import build
    from diffscrub.methods import METHODS as REGISTRY

    with pytest.raises(ConfigError, match=match):
        build(REGISTRY.get(method).config_class, values, where=method)


# ----------------------------------------------------------------------------- attention capture
@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_capture_matches_default_and_sums_to_one(name):
    pipe = _pipeline(name)
    adapter = adapter_for(pipe)
    model = adapter.denoiser
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    cond = adapter.encode_prompts(["", "a 7"], (32, 32)).take(torch.tensor([0, 1]))
    modules = {n: m for n, m, _ in text_attention_modules(model)}
    defaults = {n: type(m.processor) for n, m in modules.items()}

    # Module level: every capturing processor, in both modes, returns what the default one returns.
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, n=n: inputs.setdefault(n, (args, kw)), with_kwargs=True)
             for n, m in modules.items()]
    with torch.no_grad():
        reference = adapter.call(model, z, t, cond)
    for h in hooks:
        h.remove()
    assert set(inputs) == set(modules)
    with torch.no_grad():
        for n, (args, kw) in inputs.items():
            ref = modules[n](*args, **kw)
            for explicit in (False, True):
                with capture_text_attention(model, [n], AttentionRecorder(explicit=explicit)) as rec:
                    got = modules[n](*args, **kw)
                for a, b in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
                    assert torch.allclose(a, b, atol=1e-5), (n, explicit, (a - b).abs().max())
                assert len(rec.records) == 1

    # Model level, explicit: output = probs @ V; maps are softmaxes over all keys, then sliced.
    with capture_text_attention(model, recorder=AttentionRecorder(explicit=True)) as full_rec:
        out = adapter.call(model, z, t, cond)
    assert {n: type(m.processor) for n, m in modules.items()} == defaults  # restored
    assert torch.allclose(out, reference, atol=1e-5)
    assert len(full_rec.records) == len(modules)
    n_img = 16 * 16 // 4 if name in ("pixart", "sd3", "flux") else None
    text_len = cond["encoder_hidden_states"].shape[1]
    for r in full_rec.records:
        assert torch.allclose(r.full.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.equal(r.probs, r.full[:, :, r.rows, r.cols]) and r.probs.shape[-1] == text_len
        if r.kind == "cross":
            assert r.n_keys == text_len
        else:  # joint: image queries only; keys = image + text tokens
            assert r.probs.shape[2] == n_img and r.n_keys == n_img + text_len
            assert (r.probs.sum(-1) < 1).all()

    # Model level, default mode with the concept's columns: same output, same probabilities, gradients.
    positions = concept_token_positions(adapter, "a 7", text_len)
    with capture_text_attention(model, recorder=AttentionRecorder(columns=positions)) as rec:
        out = adapter.call(model, z, t, cond)
    assert torch.allclose(out, reference, atol=1e-5)
    for r, f in zip(rec.records, full_rec.records):
        assert r.name == f.name and r.full is None and r.n_keys == f.n_keys
        assert torch.allclose(r.probs, f.probs[..., positions], atol=1e-6)
    rec.records[0].probs.sum().backward()
    first = modules[rec.records[0].name]
    grad = first.to_q.weight.grad.clone()
    assert grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # The checkpointed slice gives the gradient of the explicit map.
    with capture_text_attention(model, [rec.records[0].name], AttentionRecorder(explicit=True, columns=positions)) as ex:
        adapter.call(model, z, t, cond)
    ex.records[0].probs.sum().backward()
    assert torch.allclose(first.to_q.weight.grad, grad, atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name,expected", [
    ("sd", [1, 2]), ("sdxl", [1, 2]), ("pixart", [0, 1]), ("sd3", [1, 2, 16, 17]), ("flux", [0, 1]),
])
def test_concept_token_positions(name, expected):
    adapter = adapter_for(_pipeline(name))
    text_len = adapter.encode_prompts(["a 7"], (32, 32)).kwargs["encoder_hidden_states"].shape[1]
    assert concept_token_positions(adapter, "a 7", text_len).tolist() == expected


# ----------------------------------------------------------------------------- ESD target
class _StubAdapter:
    split_variance = DenoiserAdapter.split_variance


def _stub_ctx(out_channels, schedule=None, teacher=None):
    """A context whose teacher returns U for label 0 (null) and K for label 1 (concept)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, out_channels, 4, 4, generator=g)
    k = torch.randn(1, out_channels, 4, 4, generator=g)

    def teacher_predict(z, t, cond, features=False):
        if teacher is not None:
            return teacher(z, t, cond), None
        labels = cond["label"]
        return torch.where(labels.view(-1, 1, 1, 1) == 1, k, u).expand(z.shape[0], -1, -1, -1).clone(), None

    ctx = SimpleNamespace(
        adapter=_StubAdapter(), forget=SimpleNamespace(mean=torch.zeros(1, 4, 4, 4)), latent_hw=(4, 4),
        cond=Conditioning([""], {"label": torch.tensor([0])}), null_index=lambda b: torch.zeros(b, dtype=torch.long),
        teacher_predict=teacher_predict, concept_prompt="c", anchor_prompt="", device=torch.device("cpu"),
        schedule=schedule, generator=g, encode_prompts=lambda p: Conditioning(list(p), {"label": torch.tensor([1])}),
    )
    return ctx, u, k


@pytest.mark.parametrize("out_channels", [4, 8])
def test_esd_target_formula(out_channels):
    from diffscrub.methods.esd import ESD, ESDConfig

    ctx, u, k = _stub_ctx(out_channels)
    method = ESD(ESDConfig(eta=2.0), ctx)
    target = method.target(torch.zeros(3, 4, 4, 4), torch.tensor([10, 20, 30]))
    expected = u[:, :4] - 2.0 * (k[:, :4] - u[:, :4])
    assert torch.allclose(target[:, :4], expected.expand(3, -1, -1, -1), atol=1e-6)
    if out_channels == 8:  # learned variance: the concept's own variance channels, unguided
        assert torch.equal(target[:, 4:], k[:, 4:].expand(3, -1, -1, -1))


def test_esd_without_concept_prompt_names_the_flag():
    from diffscrub.methods.esd import ESD, ESDConfig

    ctx, _, _ = _stub_ctx(4)
    ctx.concept_prompt = None
    with pytest.raises(ConfigError, match="--concept-prompt"):
        ESD(ESDConfig(), ctx)


# ----------------------------------------------------------------------------- sampler
def test_sampler_is_exact_euler_on_flow():
    from diffscrub.methods.common import sample_to

    v = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx, _, _ = _stub_ctx(4, FlowSchedule(), teacher=lambda z, t, c: v.clone())
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t_stop = torch.tensor([250, 600])
    z = sample_to(ctx, {"label": torch.tensor([1, 1])}, t_stop, 3, noise=noise)
    s = t_stop.float() / 1000
    assert torch.allclose(z, noise + (s - 0.999).view(-1, 1, 1, 1) * v, atol=1e-5)


@pytest.mark.parametrize("out_channels", [4, 8])
def test_sampler_is_exact_ddim_with_a_perfect_eps_model(out_channels):
    """A teacher that knows the noise makes DDIM land exactly on add_noise(z0, eps, t_stop)."""
    from diffscrub.methods.common import sample_to

    g = torch.Generator().manual_seed(3)
    z0, e = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    extra = torch.randn(2, out_channels - 4, 4, 4, generator=g)  # learned-variance channels, ignored
    schedule = DDPMSchedule(torch.linspace(0.9999, 0.01, 1000))
    ctx, _, _ = _stub_ctx(out_channels, schedule, teacher=lambda z, t, c: torch.cat([e, extra], 1))
    t_stop = torch.tensor([100, 500])
    start = schedule.add_noise(z0, e, torch.tensor([999, 999]))
    z = sample_to(ctx, {"label": torch.tensor([1, 1])}, t_stop, 4, noise=start)
    assert torch.allclose(z, schedule.add_noise(z0, e, t_stop), atol=1e-4)


# ----------------------------------------------------------------------------- VDU
def test_vdu_precision_from_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from diffscrub.methods.vdu.method import checkpoint_precision, stability

    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g), "other": torch.ones(1)}
              for _ in range(3)]
    paths = []
    for i, s in enumerate(states):
        save_file(s, str(tmp_path / f"{i}.safetensors"))
        paths.append(str(tmp_path / f"{i}.safetensors"))
    shapes = {"w": torch.Size([3, 2]), "b": torch.Size([2])}
    precision, mean = checkpoint_precision(paths, shapes, eps=1e-3)
    for n in shapes:
        stack = torch.stack([s[n] for s in states])
        assert torch.allclose(precision[n], 1.0 / (stack.var(dim=0) + 1e-3), rtol=1e-5)
        assert torch.allclose(mean[n], stack.mean(0), atol=1e-6)

    # The regulariser is zero at theta*, and the precision-weighted squared distance elsewhere.
    anchor = {n: mean[n].clone().requires_grad_(True) for n in shapes}
    assert float(stability(anchor, mean, precision).detach()) == 0.0
    moved = {n: mean[n] + 0.1 for n in shapes}
    expected = sum(float((precision[n] * 0.01).sum()) for n in shapes)
    assert float(stability(moved, mean, precision)) == pytest.approx(expected, rel=1e-5)

    with pytest.raises(ConfigError, match="has no tensor 'missing'"):
        checkpoint_precision(paths, {"missing": torch.Size([1])}, eps=1e-3)


def test_vdu_plasticity_is_bounded():
    from diffscrub.methods.vdu.method import bounded_plasticity

    losses = torch.tensor([0.5, 2.0, 5.0, 1e6], requires_grad=True)
    out = torch.stack([bounded_plasticity(x, 2.0) for x in losses])
    assert (out <= 2.0).all() and torch.equal(out.detach(), torch.tensor([0.5, 2.0, 2.0, 2.0]))
    (-out.sum()).backward()
    assert losses.grad[0] == -1 and (losses.grad[2:] == 0).all()  # no push past the cap


def test_vdu_with_checkpoints_end_to_end(image_dirs, tmp_path, monkeypatch):
    """Precision from checkpoints (no retain), anchored at their mean."""
    from safetensors.torch import save_file

    state = adapter_for(_pipeline("dit")).denoiser.state_dict()
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        noisy = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
        save_file(noisy, str(tmp_path / f"ckpt{i}.safetensors"))
        paths.append(str(tmp_path / f"ckpt{i}.safetensors"))
    pipe, before, _, result = run_method("vdu", "dit", image_dirs, tmp_path / "out", monkeypatch,
                                         {"checkpoints": paths, "prior_mean": "checkpoints"}, trainable="attention")
    assert result.record["prepare"]["precision_source"] == "checkpoints"
    assert result.record["prepare"]["precision_mean"] == pytest.approx(1.0)
    assert changed_params(pipe, before)


# ----------------------------------------------------------------------------- attention losses
def test_attention_losses_vanish_at_their_targets():
    from diffscrub.methods.attention.method import distance_loss, resteer_loss

    uniform = torch.full((2, 3, 5, 2), 0.25)
    assert float(distance_loss([uniform, uniform], [0.25, 0.25])) == 0.0
    assert float(distance_loss([uniform], [0.5])) == pytest.approx(3 * (0.25 * 10 ** 0.5))  # 3 heads
    assert float(resteer_loss([torch.zeros(2, 3, 5, 2)])) == 0.0
    maps = [torch.rand(2, 3, 5, 2), torch.rand(2, 1, 4, 2)]
    flat = torch.cat([m.flatten(1) for m in maps], dim=1)
    assert float(resteer_loss(maps)) == pytest.approx(float(flat.norm(dim=1).mean()), rel=1e-6)
    ref = torch.rand(3, 5, 2)
    assert float(distance_loss([ref.expand(2, -1, -1, -1)], [ref])) == 0.0
