"""Noise schedules, blinding, the forget target and the mask fills."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffscrub.concept import blind, surround_fill
from diffscrub.errors import ConfigError
from diffscrub.schedules import DDPMSchedule, FlowSchedule, schedule_from_scheduler


def ddpm():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return DDPMSchedule(torch.cumprod(1 - betas, 0))


SCHEDULES = {"ddpm": ddpm, "flow": FlowSchedule}


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", SCHEDULES)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(0, 999))
def test_blinding_properties(kind, seed, t):
    """Mask 0 leaves z_t unchanged; mask 1 replaces z0 entirely (same t and eps)."""
    sched = SCHEDULES[kind]()
    g = torch.Generator().manual_seed(seed)
    z0, eps, eta = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    tt = torch.tensor([t, t])
    z_t = sched.add_noise(z0, eps, tt)
    zeros, ones = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    assert torch.equal(sched.add_noise(blind(z0, zeros, eta), eps, tt), z_t)
    assert torch.allclose(sched.add_noise(blind(z0, ones, eta), eps, tt), sched.add_noise(eta, eps, tt), atol=1e-6)
    # A half mask: the left half follows z0, the right half follows eta.
    half = torch.zeros(2, 1, 8, 8)
    half[..., 4:] = 1
    zb = sched.add_noise(blind(z0, half, eta), eps, tt)
    assert torch.equal(zb[..., :4], z_t[..., :4])


@pytest.mark.parametrize("kind,prediction_type", [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("flow", "flow")])
def test_forget_target_clean_erases_where_seed_target_cannot(kind, prediction_type):
    """With a teacher that knows the blinded latent exactly, the seed's raw-prediction target implies a clean
    latent that still holds the object inside the mask (all of it for eps, a share that grows as t falls
    for v and flow); the clean target is met only by a student whose clean estimate there is the fill."""
    from diffscrub.methods.tss.method import forget_loss

    sched = SCHEDULES[kind]()
    if kind == "ddpm":
        sched.prediction_type = prediction_type
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([150, 450, 800])
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., 2:5, 2:6] = 1
    inside = mask.expand_as(z0).bool()
    z0_blind = blind(z0, mask, surround_fill(z0, mask))
    z_t, z_t_blind = sched.add_noise(z0, eps, t), sched.add_noise(z0_blind, eps, t)
    teacher_blind = sched.target(z0_blind, eps, t)  # a teacher that knows the blinded latent exactly
    unchanged = sched.target(z0, eps, t)  # the student before training: denoises z_t faithfully

    # What a student that meets the seed's target at z_t implies as its clean latent: z0 * c + fill * (1 - c).
    implied = sched.predict_z0(z_t, teacher_blind, t)
    c = ((implied - z0_blind)[inside] / (z0 - z0_blind)[inside]).reshape(3, -1)
    assert torch.allclose(c, c[:, :1].expand_as(c), atol=1e-3)  # one share per sample
    share = c[:, 0]
    if prediction_type == "epsilon":
        assert torch.allclose(share, torch.ones(3), atol=1e-4)  # the object comes back in full
        assert forget_loss(sched, "seed", unchanged, z_t, teacher_blind, z_t_blind, t, mask) < 1e-10
    else:
        assert share[0] > 0.5 and share[0] > share[1] > share[2] > 0  # more of it kept the smaller t

    # The clean target: the unchanged student is penalised; one whose clean estimate is z0_blind is not.
    erased_noise = (z_t - sched.add_noise(z0_blind, torch.zeros_like(eps), t)) / _expand_s(sched, t)
    erased = sched.target(z0_blind, erased_noise, t)  # the prediction at z_t that implies z0_blind
    assert torch.allclose(sched.predict_z0(z_t, erased, t), z0_blind, atol=1e-4)
    assert forget_loss(sched, "clean", unchanged, z_t, teacher_blind, z_t_blind, t, mask) > 1e-3
    assert forget_loss(sched, "clean", erased, z_t, teacher_blind, z_t_blind, t, mask) < 1e-8


def test_forget_loss_learned_variance_uses_mean_channels():
    """DiT/PixArt predict [mean, variance] (2C channels): the clean target reads the mean half only."""
    from diffscrub.methods.tss.method import forget_loss

    sched = SCHEDULES["ddpm"]()
    g = torch.Generator().manual_seed(1)
    z_t, z_tb, s_mean, t_mean, var = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(5))
    t, mask = torch.tensor([300, 600]), torch.ones(2, 1, 6, 6)
    base = forget_loss(sched, "clean", s_mean, z_t, t_mean, z_tb, t, mask)
    same_var = forget_loss(sched, "clean", torch.cat([s_mean, var], 1), z_t, torch.cat([t_mean, var], 1), z_tb, t, mask)
    assert torch.allclose(base, same_var)
    other_var = forget_loss(sched, "clean", torch.cat([s_mean, var], 1), z_t, torch.cat([t_mean, -var], 1), z_tb, t,
                            mask)
    assert other_var > base


@pytest.mark.parametrize("kind,prediction_type", [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("flow", "flow")])
def test_clean_keep_weight_gives_high_t_the_forget_terms_weight(kind, prediction_type):
    """keep_weight 'clean': a keep term's error at one input, in clean-latent units weighted as the forget
    term, is (for eps) the prediction-space error times clamp(SNR, floor, gamma) / SNR: far more at high t,
    where an eps-space term fades, and less at small t (v and flow: about the same at high t, less at small t).
    Zero when student and teacher agree."""
    from diffscrub.methods.tss.method import clean_mse, masked_mse

    sched = SCHEDULES[kind]()
    if kind == "ddpm":
        sched.prediction_type = prediction_type
    g = torch.Generator().manual_seed(2)
    z_t, teacher, delta = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    t = torch.tensor([20, 500, 980])
    per = [float(clean_mse(sched, teacher[i:i + 1] + delta[i:i + 1], z_t[i:i + 1], teacher[i:i + 1],
                           z_t[i:i + 1], t[i:i + 1], 1.0, 5.0, 1.0)
                 / masked_mse(teacher[i:i + 1] + delta[i:i + 1], teacher[i:i + 1], 1.0)) for i in range(3)]
    assert per[0] < per[2]  # against the prediction-space term, small t loses weight to large t
    if prediction_type == "epsilon":  # an eps error is worth 1 / SNR in clean units: ~200 at the last steps
        snr = sched.snr(t)
        assert torch.allclose(torch.tensor(per), snr.clamp(1.0, 5.0) / snr, rtol=1e-4)
        assert per[0] < 1 < per[1] < per[2] and per[2] > 50
    else:  # v and flow predictions already carry clean-latent units at high t (x0 error = s * v error)
        assert abs(per[2] - 1) < 0.1
    assert float(clean_mse(sched, teacher, z_t, teacher, z_t, t, 1.0, 5.0, 1.0)) == 0.0


def _expand_s(sched, t):
    return sched.coefficients(t)[1].reshape(-1, 1, 1, 1)


def test_surround_fill_is_the_mean_outside_the_mask():
    z0 = torch.zeros(2, 3, 4, 4)
    z0[0, :, :, :2] = 2.0  # left half 2, right half 0
    z0[1] = torch.arange(3.0).reshape(3, 1, 1)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :, 2:] = 1  # mask the right half: the surround is the left half
    fill = surround_fill(z0, mask)
    assert fill.shape == z0.shape
    assert torch.allclose(fill[0], torch.full((3, 4, 4), 2.0))
    assert torch.allclose(fill[1], z0[1])  # empty mask: per-channel mean of the whole latent
    full = torch.ones(2, 1, 4, 4)  # nothing outside: falls back to the image's own mean
    assert torch.allclose(surround_fill(z0, full)[0], z0[0].mean(dim=(1, 2), keepdim=True).expand(3, 4, 4))


def test_surround_fill_prior_takes_over_as_the_surround_shrinks():
    z0 = torch.full((2, 3, 4, 4), 2.0)  # the concept's colour everywhere (a background concept)
    prior = torch.tensor([-1.0, 0.0, 1.0])  # the contrast images' mean colour
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :, 2:] = 1  # half the image masked: 8 pixels of surround
    mask[1] = 1  # all of it
    fill = surround_fill(z0, mask, prior, prior_weight=0.5)  # 8 pixels' worth of prior
    assert torch.allclose(fill[0, :, 0, 0], (8 * 2.0 + 8 * prior) / 16)
    assert torch.allclose(fill[1], prior.reshape(3, 1, 1).expand(3, 4, 4))  # no surround: the prior alone
    assert torch.allclose(surround_fill(z0, mask, prior, prior_weight=0.0), surround_fill(z0, mask))
    rows = torch.stack([prior, -prior])  # [B, C]: one colour per image
    fill = surround_fill(z0, mask, rows, prior_weight=0.5)
    assert torch.allclose(fill[0, :, 0, 0], (8 * 2.0 + 8 * prior) / 16) and torch.allclose(fill[1, :, 0, 0], -prior)


def test_snr_decreases_with_t():
    for kind, make in SCHEDULES.items():
        snr = make().snr(torch.tensor([1, 100, 500, 999]))
        assert torch.all(snr[:-1] > snr[1:]), kind


def test_flow_schedule_matches_rectified_flow():
    sched = FlowSchedule()
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    s = (t.float() / 1000).view(3, 1, 1, 1)
    assert torch.allclose(sched.add_noise(z0, eps, t), (1 - s) * z0 + s * eps)
    assert torch.allclose(sched.target(z0, eps, t), eps - z0)
    assert torch.allclose(sched.predict_z0(sched.add_noise(z0, eps, t), eps - z0, t), z0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_schedule_matches_diffusers(prediction_type):
    from diffusers import DDIMScheduler

    sched = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type))
    ref = DDIMScheduler(beta_schedule="scaled_linear")
    z0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(sched.add_noise(z0, eps, t), ref.add_noise(z0, eps, t), atol=1e-5)
    z_t = sched.add_noise(z0, eps, t)
    target = sched.target(z0, eps, t)
    assert torch.allclose(sched.predict_z0(z_t, target, t)[1:], z0[1:], atol=1e-3)
    if prediction_type == "v_prediction":
        assert torch.allclose(target, ref.get_velocity(z0, eps, t), atol=1e-5)


def test_flow_scheduler_detected():
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert isinstance(schedule_from_scheduler(FlowMatchEulerDiscreteScheduler()), FlowSchedule)


def test_timestep_band_outside_schedule_is_refused():
    with pytest.raises(ConfigError, match="outside the schedule"):
        FlowSchedule().sample_timesteps(2, 300, 1200)
