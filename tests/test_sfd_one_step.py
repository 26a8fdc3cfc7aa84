"""SFD's one-step generator (``sfd --one-step``): the SiD losses, resume state, every family, sampling, eval.

Unit tests drive :class:`OneStepDistiller` with a tiny convolutional "denoiser" and the real DDPM
schedule, so the properties of score identity distillation can be checked exactly: the generator
loss and its gradient vanish when the fake score equals the teacher (the generator already matches
the teacher), the forgetting rows do not, and the fake score's step learns the generator's samples.
"""

from __future__ import annotations

import contextlib
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_methods import FAMILIES, fresh_pipeline, image_dirs, run_method  # noqa: F401 (fixture)

from diffscrub.adapters import adapter_for
from diffscrub.errors import ConfigError
from diffscrub.evaluation.sampling import one_step_timestep, sample_one_step
from diffscrub.methods.sfd import SFDConfig
from diffscrub.methods.sfd.generator import OneStepDistiller
from diffscrub.schedules import DDPMSchedule


class _Denoiser(torch.nn.Module):
    """Epsilon prediction ``conv(z) * scale[b] + t / 1000`` (``scale`` plays the prompt)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, z, t, scale):
        return self.conv(z) * scale.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float() / 1000


class _Adapter:
    def predict(self, model, z, t, cond, features=False):
        return model(z, t, cond["scale"]), None

    def split_variance(self, out, channels):
        return out, None


def _ctx(student, teacher, seed=0):
    """A context with the parts :class:`OneStepDistiller` uses, on a real DDPM schedule."""
    betas = torch.linspace(1e-4, 2e-2, 1000)
    gen = torch.Generator().manual_seed(seed)
    adapter = _Adapter()
    ctx = SimpleNamespace(
        adapter=adapter, schedule=DDPMSchedule(torch.cumprod(1 - betas, 0)), student=student, teacher=teacher, lr=1e-3,
        forget=SimpleNamespace(mean=torch.zeros(1, 4, 8, 8)), latent_hw=(8, 8), world=1, generator=gen,
        autocast=contextlib.nullcontext,
    )
    ctx.randn = lambda b, *shape: torch.randn((b, *shape), generator=gen)
    ctx.randn_like = lambda x: torch.randn(x.shape, generator=gen)
    ctx.timesteps = lambda b, low=0, high=None: torch.randint(low, high or 1000, (b,), generator=gen)
    ctx.student_predict = lambda z, t, cond: adapter.predict(student, z, t, cond)[0]

    def teacher_predict(z, t, cond, features=False, grad=False):
        with torch.set_grad_enabled(grad):
            return adapter.predict(teacher, z, t, cond)[0], None

    ctx.teacher_predict = teacher_predict
    return ctx


def _pair(seed=0):
    student = _Denoiser(seed)
    teacher = copy.deepcopy(student).requires_grad_(False)
    return student, teacher


def _cond(*scales):
    return {"scale": torch.tensor(scales, dtype=torch.float32)}


def test_generator_loss_and_gradient_vanish_when_the_fake_score_is_the_teacher():
    student, teacher = _pair()
    dist = OneStepDistiller(_ctx(student, teacher), SFDConfig(one_step=True))
    cond = _cond(1.0, 1.0, 0.5)
    per = dist.generator_loss(cond, cond, None, 3)  # fake == teacher (both copies of the start)
    assert per.shape == (3,) and torch.allclose(per, torch.zeros(3), atol=1e-6)
    per.mean().backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in student.parameters())


def test_forgetting_rows_are_pulled_and_the_formula_is_sids():
    student, teacher = _pair()
    ctx = _ctx(student, teacher, seed=3)
    cfg = SFDConfig(one_step=True, sid_alpha=1.2)
    dist = OneStepDistiller(ctx, cfg)
    gen_cond, teacher_cond = _cond(1.0, 1.0), _cond(0.2, 1.0)  # row 0: the concept, scored under the anchor
    per = dist.generator_loss(gen_cond, teacher_cond, None, 2)
    assert per[0].abs() > 1e-4 and per[1].abs() < 1e-6

    # the same draws by hand: (1 - alpha) |D_T - D_F|^2 + (D_T - D_F).(D_F - x_g), over mean |x_g - D_T|
    ctx2 = _ctx(student, teacher, seed=3)
    s = ctx2.schedule
    z = ctx2.randn(2, 4, 8, 8)
    tg = torch.full((2,), cfg.generator_t)
    with torch.no_grad():
        x_g = s.predict_z0(z, student(z, tg, gen_cond["scale"]), tg)
        eps = ctx2.randn_like(x_g)
        t = ctx2.timesteps(2)
        x_t = s.add_noise(x_g, eps, t)
        d_t = s.predict_z0(x_t, teacher(x_t, t, teacher_cond["scale"]), t)
        d_f = s.predict_z0(x_t, teacher(x_t, t, gen_cond["scale"]), t)  # the fake is still the start
        diff = d_t - d_f
        by_hand = ((1 - 1.2) * diff.pow(2) + diff * (d_f - x_g)).flatten(1).mean(1)
        by_hand = by_hand / (x_g - d_t).abs().flatten(1).mean(1)
    assert torch.allclose(per.detach(), by_hand, rtol=1e-4, atol=1e-7)


def test_fake_step_learns_the_generator_samples_and_leaves_the_others():
    student, teacher = _pair()
    ctx = _ctx(student, teacher)
    dist = OneStepDistiller(ctx, SFDConfig(one_step=True, t_low=100, t_high=101))
    frozen = {k: v.clone() for k, v in student.state_dict().items()}
    cond = _cond(*([1.0] * 8))
    losses = [float(dist.fake_step(cond, 8)) for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in frozen.items())  # the generator is not touched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(dist.fake.conv.weight, teacher.conv.weight)


def test_state_dict_round_trip_continues_identically():
    student, teacher = _pair()
    first = OneStepDistiller(_ctx(student, teacher, seed=1), SFDConfig(one_step=True))
    for _ in range(3):
        first.fake_step(_cond(1.0, 0.5), 2)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert any(k.startswith("fake_opt.") and k.endswith(".exp_avg_sq") for k in state)

    second = OneStepDistiller(_ctx(student, teacher, seed=1), SFDConfig(one_step=True))
    second.load_state_dict(state)
    first.ctx.generator.manual_seed(7)
    second.ctx.generator.manual_seed(7)
    a, b = first.fake_step(_cond(1.0, 0.5), 2), second.fake_step(_cond(1.0, 0.5), 2)
    assert torch.equal(a, b)
    for pa, pb in zip(first.fake.parameters(), second.fake.parameters()):
        assert torch.equal(pa, pb)


def test_one_step_refusals():
    student, _ = _pair()
    with pytest.raises(ConfigError, match="--trainable full"):
        OneStepDistiller(_ctx(student, None), SFDConfig(one_step=True))
    with pytest.raises(ConfigError, match="generator_t=1000"):
        OneStepDistiller(_ctx(*_pair()), SFDConfig(one_step=True, generator_t=1000))
    with pytest.raises(ConfigError, match="sfd.sid_alpha"):
        SFDConfig(sid_alpha=-1)


# ----------------------------------------------------------------------------- every family, end to end
@pytest.mark.parametrize("name", FAMILIES)
def test_one_step_on_family_then_samples_in_one_call(name, image_dirs, tmp_path, monkeypatch):  # noqa: F811
    concept = "seven" if name == "dit" else "a 7"
    pipe, before, teacher, result = run_method("sfd", name, image_dirs, tmp_path / "out", monkeypatch,
                                               options={"one_step": True, "generator_t": 600},
                                               concept_prompt=concept)
    record = result.record
    assert record["sampling"] == {"one_step_timestep": 600}
    assert all(np.isfinite(row["total"]) and np.isfinite(row["fake"]) for row in record["losses"])
    after = adapter_for(pipe).denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the generator did not move"
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    saved = json.loads((tmp_path / "out" / "diffscrub.json").read_text())
    assert one_step_timestep(str(tmp_path / "out")) == 600 == saved["sampling"]["one_step_timestep"]

    prompts = [concept, "", concept]
    images = sample_one_step(pipe, prompts, [0, 1, 0], timestep=600, height=32, width=32, batch_size=2)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images[0], images[2], atol=1e-5)  # a sample depends on its prompt and seed only
    assert not torch.allclose(images[0], images[1], atol=1e-3)


def test_one_step_sampler_is_what_diffusers_gives_with_one_custom_timestep():
    """What the README tells users: a one-step output samples in plain diffusers with a scheduler that
    takes custom timesteps, ``timesteps=[t]`` and no guidance; the same images as diffscrub's sampler."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = fresh_pipeline("sd")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a 7", "a 3"], [5, 6]
    ours = sample_one_step(pipe, prompts, seeds, timestep=625, height=32, width=32)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    theirs = pipe(prompt=prompts, generator=gens, timesteps=[625], guidance_scale=1.0, height=32, width=32,
                  output_type="pt").images
    assert torch.allclose(ours, theirs.float(), atol=2e-3)


def test_one_step_sampler_on_flow_is_diffusers_with_one_sigma():
    """Flow models (SD3 here): one Euler step from sigma t/1000 to 0 in plain diffusers; the scheduler
    shifts the sigmas it is given, so the README's recipe passes the unshifted one,
    ``sigma / (shift - (shift - 1) sigma)``."""
    pipe = fresh_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    shift = pipe.scheduler.config.shift
    sigma = 0.625
    unshifted = sigma / (shift - (shift - 1) * sigma)
    ours = sample_one_step(pipe, ["a 7"], [3], timestep=625, height=32, width=32)
    # the T5 length the adapter encodes with (the tiny tokenizer's 16; 256 on SD3 itself)
    inputs = adapter_for(pipe).pipeline_inputs(["a 7"], (32, 32))
    theirs = pipe(**inputs, generator=[torch.Generator("cpu").manual_seed(3)], sigmas=[unshifted],
                  guidance_scale=1.0, output_type="pt").images
    assert torch.allclose(ours, theirs.float(), atol=2e-3)


def test_eval_samples_a_one_step_model_in_one_call(tmp_path, monkeypatch):
    from diffscrub.evaluation import EvalConfig, evaluate
    from test_evaluation import _stub_classifier, _write_images

    import diffscrub.evaluation.run as run_module

    _write_images(tmp_path / "forget", 2, 0)
    model = tmp_path / "model"
    model.mkdir()
    (model / "diffscrub.json").write_text(json.dumps({"method": "sfd", "sampling": {"one_step_timestep": 500}}))
    calls = []
    real = run_module.sample_one_step

    def spy(pipe, prompts, seeds, **kw):
        calls.append((pipe, kw["timestep"]))
        return real(pipe, prompts, seeds, **kw)

    monkeypatch.setattr(run_module, "sample_one_step", spy)
    erased, reference = fresh_pipeline("sd"), fresh_pipeline("sd")
    (tmp_path / "p.yaml").write_text("concept: [a 7]\nother: [a 3]\n")
    result = evaluate(EvalConfig(model=str(model), forget=str(tmp_path / "forget"), prompts=str(tmp_path / "p.yaml"),
                                 out=str(tmp_path / "eval"), n=2, n_null=2, steps=2, guidance=2.0, bootstrap=20,
                                 quiet=True),
                      pipe=erased, reference_pipe=reference, classifier=_stub_classifier)
    assert calls and all(p is erased and t == 500 for p, t in calls)  # the reference samples as usual
    assert result["sampling"]["erased_one_step_timestep"] == 500
    assert "reference_one_step_timestep" not in result["sampling"]
    # same weights, different samplers: the images differ
    assert result["sets"]["other"]["preservation"]["pixel_diff"]["mean"] > 0
