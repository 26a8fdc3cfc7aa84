"""Schedules, blinding, masks, per-step cost, config merging and the command line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffscrub.concept import blind, concept_mask, fit_prototypes, surround_fill
from diffscrub.adapters.base import Features
from diffscrub.config import EraseConfig, build, merge
from diffscrub.errors import ConfigError
from diffscrub.schedules import DDPMSchedule, FlowSchedule, schedule_from_scheduler
from random_images import write_random_images as _images


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


# ----------------------------------------------------------------------------- detection
def test_mask_follows_prototypes():
    """Locations whose features point along a prototype get mask ~1, orthogonal ones ~0."""
    proto = torch.eye(4)[:1]  # [1, 4]
    vec = torch.zeros(1, 16, 4)
    vec[0, :8, 0] = 3.0  # first two rows of the 4x4 grid: the concept
    vec[0, 8:, 1] = 2.0
    m = concept_mask(Features(vec, (4, 4)), proto, tau=0.6, alpha=15.0, latent_hw=(8, 8))
    assert m.shape == (1, 1, 8, 8)
    assert m[0, 0, :3].min() > 0.99 and m[0, 0, 5:].max() < 0.01
    assert m.min() >= 0 and m.max() <= 1


def test_kmeans_backends_agree():
    """torch k-means (for large vector counts, on the device) and scikit-learn's give the same
    prototypes on a fixed seed, within tolerance."""
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    data = torch.cat([c * (1 + torch.rand(800, 1, generator=g)) + 0.1 * torch.randn(800, 32, generator=g)
                      for c in centres])
    a = fit_prototypes(data, 5, seed=0, backend="sklearn")
    b = fit_prototypes(data, 5, seed=0, backend="torch")
    assert (a @ b.T).amax(dim=1).min() > 0.9999
    assert torch.equal(b, fit_prototypes(data, 5, seed=0, backend="torch"))  # seeded: repeatable
    with pytest.raises(ConfigError, match="backend 'faiss'"):
        fit_prototypes(data, 5, backend="faiss")


def test_prototypes_recover_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    data = torch.cat([c * (1 + torch.rand(200, 1, generator=g)) + 0.02 * torch.randn(200, 16, generator=g)
                      for c in centres])
    protos = fit_prototypes(data, 3, seed=0)
    sims = (protos @ centres.T).amax(dim=0)
    assert sims.min() > 0.99
    with pytest.raises(ConfigError, match="num_prototypes=10"):
        fit_prototypes(data[:5], 10)


def test_contrastive_selection_drops_shared_prototypes():
    """A prototype that fires on retain features as often as on forget ones (a background) is dropped;
    one that fires only on forget features (the concept) is kept."""
    from diffscrub.concept import select_prototypes

    concept, background, other = torch.eye(8)[:3]
    protos = torch.stack([concept, background])
    g = torch.Generator().manual_seed(0)
    noise = lambda n: 0.05 * torch.randn(n, 8, generator=g)  # noqa: E731
    forget = torch.cat([concept + noise(20), background + noise(80)])
    retain = torch.cat([background + noise(70), other + noise(30)])
    sel = select_prototypes(protos, forget, retain, tau=0.6, ratio=2.0)
    assert sel.keep.tolist() == [True, False]
    assert sel.forget_rate[0] == pytest.approx(0.2) and sel.retain_rate[0] == 0
    assert sel.forget_rate[1] == pytest.approx(0.8) and sel.retain_rate[1] == pytest.approx(0.7)
    # Nothing passes: the most forget-specific prototype is kept so the detector is never blind.
    sel = select_prototypes(protos, forget, torch.cat([retain, concept + noise(5)]), tau=0.6, ratio=1e6)
    assert sel.keep.tolist() == [True, False] and sel.retain_rate[0] > 0


def test_knn_scores_find_what_only_forget_images_share():
    """Four forget images each hold the concept and a background, a unique detail, and retain images
    the background: the concept's locations score highest, the background's and the one-image detail's
    low (a location's own image never counts as its neighbour)."""
    from diffscrub.concept.knn import knn_scores, scores_to_mask

    g = torch.Generator().manual_seed(0)
    concept, background = torch.eye(16)[:2]
    jitter = lambda *shape: 0.05 * torch.randn(*shape, 16, generator=g)  # noqa: E731
    # per forget image: 2 concept locations, 5 background, 1 unique direction
    images, ids = [], []
    for i in range(4):
        images.append(torch.cat([concept + jitter(2), background + jitter(5), torch.eye(16)[4 + i] + jitter(1)]))
        ids.append(torch.full((8,), i))
    forget, forget_ids = torch.cat(images), torch.cat(ids)
    retain = background + jitter(40)
    scores = knn_scores(forget, forget_ids, forget, forget_ids, retain, k=3, chunk=5).reshape(4, 8)
    assert scores[:, :2].min() > scores[:, 2:].max()
    assert scores[:, 7].max() < 0.5  # the unique detail has no neighbour in the other forget images
    mask = scores_to_mask(scores, area=0.25)
    assert mask[:, :2].min() > 0.95 and mask[:, 2:].max() < 0.15 and mask[:, 2:].mean() < 0.05


def test_tss_knn_fingerprint_masks(tmp_path):
    """fingerprint=knn: cached masks of latent shape in [0, 1] covering about knn_area, the prototypes
    still fitted (the report and the evaluation's detector use them)."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", conditioning="null")
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 64, "fit_draws": 1, "mask_draws": 2,
                          "fingerprint": "knn", "knn_area": 0.2}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    figures = run.method.prepare(batch_size=2)
    masks = run.method.masks
    assert masks.shape == (len(run.ctx.forget), 1, *run.ctx.latent_hw)
    assert 0 <= float(masks.min()) and float(masks.max()) <= 1
    assert 0.1 < figures["mask_mean_area"] < 0.35
    assert run.method.prototypes is not None and "forget_masks" in run.method.artifacts()


def test_tss_knn_z_keeps_a_concept_that_fills_its_images(tmp_path, monkeypatch):
    """A concept that fills every other forget image (a background): with knn_z the mask is all of those
    images and none of the others or of a forget image's non-concept part, where a fixed area cuts it.
    The reference is the contrast images scored as forget locations would be (their own image left out)."""
    from diffscrub.adapters.base import Features
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f", 6), _images(tmp_path / "r", 6)
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", conditioning="null")
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 2,
                          "fingerprint": "knn", "knn_z": 4.0, "knn_k": 3}, pipe=build_tiny_pipeline("sd"),
                    log=lambda m: None)
    ctx, method = run.ctx, run.method
    # Latents that say what each location is (channel 0 > 0: the concept): forget images 0, 2, 4 are all
    # concept; 1, 3, 5 and every retain image hold a background in their left half and an object in their
    # right half, both shared between forget and retain images.
    ctx.forget.mean[:, 0] = -1.0
    ctx.forget.mean[0::2, 0] = 1.0
    ctx.retain.mean[:, 0] = -1.0
    for cache in (ctx.forget, ctx.retain):
        cache.mean[:, 1] = 0.0
        cache.mean[:, 1, :, cache.mean.shape[-1] // 2:] = 2.0
    ctx.retain.mean[0, 0, 0, -1] = 1.0  # one location of one retain image shows the concept
    monkeypatch.setattr(ctx.schedule, "add_noise", lambda z0, noise, t: z0.clone())  # the teacher sees z0
    g = torch.Generator().manual_seed(0)

    def teacher_predict(z_t, t, cond, features=False):
        b, _, h, w = z_t.shape
        concept = z_t[:, 0] > 0  # [B, h, w]
        which = z_t[:, 1].round().long().clamp(0, 15)  # 0: background, 2: the object
        vec = torch.eye(16)[which] * ~concept[..., None] + torch.eye(16)[1] * concept[..., None]
        vec = vec + 0.05 * torch.randn(vec.shape, generator=g)
        return torch.zeros_like(z_t), Features(vec.reshape(b, h * w, 16), (h, w))

    monkeypatch.setattr(ctx, "teacher_predict", teacher_predict)
    figures = method.prepare(batch_size=2)
    masks = method.masks[:, 0]
    assert masks[0::2].min() > 0.99, masks[0::2].min()
    assert masks[1::2].max() < 0.5 and masks[1::2].mean() < 0.01, masks[1::2].max()
    assert abs(figures["mask_mean_area"] - 0.5) < 0.01
    # the reference: the retain location with the concept scores like a forget image's concept (its own
    # image is no neighbour of it), every other retain location like the forget images' background and object
    reference = method._knn_field(ctx.retain, reference=True)  # [N, h, w]
    assert reference[0, 0, -1] > 0.5
    reference[0, 0, -1] = 0.0
    assert reference.abs().max() < 0.2
    # a fixed area of 0.25 puts its threshold inside the concept's half of the scores: a share of it is cut
    method.config.knn_z, method.config.knn_area = 0.0, 0.25
    fixed = method.cache_masks(batch_size=2)[:, 0]
    assert float((fixed[0::2] < 0.5).float().mean()) > 0.25 and fixed[1::2].max() < 0.01

    # The concept's images are all mask, so the surround fill has nothing around it but their own colour;
    # --fill-prior fills each with the colour of a contrast image drawn for it, kept with the artifacts.
    import diffscrub.methods.tss.method as tss_module

    method.config.knn_z, method.config.fill_prior = 4.0, 0.5
    method.prepare(batch_size=2)
    assert torch.allclose(method.artifacts()["fill_prior"], ctx.retain.mean.float().mean(dim=(2, 3)))  # [N, C]
    colours = torch.arange(6.0)[:, None].expand(6, ctx.retain.mean.shape[1]) * 10  # told apart by their values
    method._fill_prior = colours.clone()
    fills = []
    monkeypatch.setattr(tss_module, "blind", lambda z0, mask, eta: fills.append((mask, eta)) or z0)
    monkeypatch.setattr(ctx, "teacher_predict", lambda z_t, t, cond, features=False: (torch.zeros_like(z_t), None))
    for step in range(6):  # every forget image twice
        method.loss(step, 2)
    full = [eta[i] for mask, eta in fills for i in range(len(mask)) if mask[i].min() > 0.99]
    assert len(full) == 6
    drawn = {round(float(e[0, 0, 0]) / 10) for e in full}
    for e in full:  # flat, and one contrast image's colour
        k = round(float(e[0, 0, 0]) / 10)
        assert torch.allclose(e, colours[k].reshape(-1, 1, 1).expand_as(e), atol=1e-4)
    assert len(drawn) > 1  # a colour per image, not one for all
    state = method.artifacts()
    method._fill_prior = None
    method.load_state_dict(state)
    assert torch.allclose(method._fill_prior, colours)

    # --blind-fill contrast: the masked places hold the same places of a contrast image drawn for each forget
    # image (its posterior mean), not a flat colour.
    from diffscrub.core.context import LatentCache

    method.config.fill_prior, method.config.blind_fill, method._fill_prior = 0.0, "contrast", None
    ctx.retain.mean[:] = torch.randn(ctx.retain.mean.shape, generator=g)  # textured: each image told apart
    fills.clear()
    for step in range(6):
        method.loss(step, 2)
    full = [eta[i] for mask, eta in fills for i in range(len(mask)) if mask[i].min() > 0.99]
    picked = [int(((ctx.retain.mean - e).abs().amax(dim=(1, 2, 3)) < 1e-5).nonzero()[0]) for e in full]
    assert len(full) == 6 and len(set(picked)) > 1
    # Without a retain folder the contrast images are null-prompt samples drawn for the run: a resume (or
    # another process) takes them from the state, rather than drawing others.
    drawn = LatentCache(torch.randn(ctx.retain.mean.shape, generator=g), torch.zeros_like(ctx.retain.mean))
    ctx.retain, method._contrast = None, drawn
    state = method.state_dict()
    method._contrast = None
    method.load_state_dict(state)
    assert torch.equal(method._contrast.mean, drawn.mean)
    fills.clear()
    method.loss(0, 2)
    assert all(((drawn.mean - eta[i]).abs().amax(dim=(1, 2, 3)) < 1e-5).any() for _, eta in fills for i in range(2))


def test_names_smoothing_keeps_a_level_field_and_spreads_a_spike():
    from diffscrub.concept.naming import box_kernel, smooth

    assert box_kernel(16, 0.1875) == 3 and box_kernel(64, 0.1875) == 13 and box_kernel(16, 0.0) == 1
    level = torch.full((2, 8, 8), 3.0)
    assert torch.allclose(smooth(level, 0.375), level)  # borders average only what they have
    spike = torch.zeros(1, 8, 8)
    spike[0, 4, 4] = 9.0
    out = smooth(spike, 0.375)  # 3 x 3
    assert out[0, 3:6, 3:6].eq(1.0).all() and out.sum() == 9.0
    assert torch.equal(smooth(spike, 0.0), spike)


def _names_run(tmp_path, **tss):
    from diffscrub.core.naming import name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", names=["cat"], name_contexts=["{}", "{} on grass"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 64, "fit_draws": 1, "contrast_samples": 2,
                          "contrast_sample_steps": 1, "fingerprint": "names", **tss},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    name_concept(run, lambda m: None)
    return run


def test_tss_names_fingerprint_marks_where_the_name_lowers_the_error(tmp_path, monkeypatch):
    """A teacher that denoises a square exactly under the named prompts and misses it by 1 under their neutral
    forms: the mask keeps that square, and each draw pairs a named prompt with its own neutral form, going round
    the named prompts."""
    run = _names_run(tmp_path, mask_draws=2, knn_area=0.2, names_smooth=0.0)
    ctx, method = run.ctx, run.method
    assert ctx.schedule.prediction_type == "epsilon"  # the fake teacher returns the target: the noise
    named = method._naming_prompts().tolist()
    assert [ctx.cond.prompts[i] for i in named] == ["cat", "cat on grass"]
    drawn, calls = [], []
    real_randn = ctx.randn_like

    def randn_like(x):
        drawn.append(real_randn(x))
        return drawn[-1]

    def teacher_predict(z_t, t, cond, features=False):
        calls.append(cond["encoder_hidden_states"])
        eps = drawn[-1]
        miss = torch.zeros_like(eps)
        h, w = ctx.latent_hw
        miss[:, :, : h // 2, : w // 2] = 1.0  # the square: a quarter of the latent
        return torch.cat([eps + miss, eps]), None  # [neutral forms; named prompts]

    monkeypatch.setattr(ctx, "randn_like", randn_like)
    monkeypatch.setattr(ctx, "teacher_predict", teacher_predict)
    masks = method.cache_masks(batch_size=2)
    square = torch.zeros(ctx.latent_hw)
    square[: ctx.latent_hw[0] // 2, : ctx.latent_hw[1] // 2] = 1
    assert masks.shape == (len(ctx.forget), 1, *ctx.latent_hw)
    # the square is a quarter of the latent and holds every top score: the threshold is its score (mask 0.5)
    assert masks[:, 0, square.bool()].min() > 0.49 and masks[:, 0, ~square.bool()].max() < 0.01
    # the conditioning: neutral forms first, then the named prompts, image i of draw d under named[(d N + i) % K]
    enc = ctx.cond.kwargs["encoder_hidden_states"]
    n = len(ctx.forget)
    expected = [named[(d * n + i) % len(named)] for d in range(2) for i in range(n)]
    got_named = torch.cat([c[c.shape[0] // 2:] for c in calls])
    got_neutral = torch.cat([c[:c.shape[0] // 2] for c in calls])
    assert torch.equal(got_named, enc[expected].to(got_named.dtype))
    assert torch.equal(got_neutral, enc[ctx.cond.neutral_index(torch.tensor(expected))].to(got_named.dtype))
    assert {ctx.cond.prompts[i] for i in ctx.cond.neutral_index(torch.tensor(named)).tolist()} == {"", "on grass"}


def test_reference_mask_threshold_comes_from_the_reference_and_ignores_its_outliers():
    from diffscrub.concept.naming import reference_mask, robust_spread

    g = torch.Generator().manual_seed(0)
    reference = torch.randn(4000, generator=g)  # no concept: median 0, sigma 1
    median, sigma = robust_spread(reference)
    assert abs(float(median)) < 0.1 and abs(float(sigma) - 1) < 0.1
    scores = torch.tensor([-1.0, 0.0, 2.0, 3.0, 4.0, 10.0])
    mask = reference_mask(scores, reference, z=3.0)
    assert mask[:3].max() < 0.05 and mask[-1] > 0.99 and abs(float(mask[3]) - 0.5) < 0.15  # 0.5 at z sigmas
    # a tenth of the reference showing the concept (scores of 10) moves the threshold by under half a sigma,
    # where the mean and standard deviation would put it at the concept's own scores
    tainted = torch.cat([reference, torch.full((400,), 10.0)])
    median, sigma = robust_spread(tainted)
    assert 3.0 < float(median + 3 * sigma) < 3.5 and float(tainted.mean() + 3 * tainted.std()) > 9.5
    assert reference_mask(scores, tainted, 3.0)[-1] > 0.99
    assert reference_mask(scores, torch.zeros(10), 3.0)[2:].min() > 0.99  # a constant reference: all above it


def test_tss_names_z_keeps_what_scores_above_the_reference_whatever_its_area(tmp_path, monkeypatch):
    """A concept that fills every other forget image: with names_z the mask is all of those images and none
    of the others, where a fixed area would cut it; the threshold comes from the contrast images' scores,
    which are drawn once per run (the contrastive selection reads the same samples)."""
    run = _names_run(tmp_path, mask_draws=2, names_smooth=0.0, names_z=3.0)
    ctx, method = run.ctx, run.method
    n, generated, calls = len(ctx.forget), [], []
    real_generate = ctx.generate_latents

    def generate_latents(*a, **k):
        generated.append(1)
        return real_generate(*a, **k)

    def teacher_predict(z_t, t, cond, features=False):
        if features:  # phase 1's prototype pass: the real teacher
            return real_teacher(z_t, t, cond, features=True)
        calls.append(1)
        b = z_t.shape[0] // 2
        eps = target_noise[-1]
        g = torch.Generator().manual_seed(len(calls))
        neutral = eps + 0.1 * torch.randn(eps.shape, generator=g)  # the reference: small differences both ways
        forget_call = len(calls) <= 2 * ((n + 1) // 2)
        if forget_call:
            neutral = eps.clone()
            neutral[0::2] += 1.0  # images 0, 2, ... (row 0 of each batch of 2): the concept everywhere
        return torch.cat([neutral, eps]), None

    target_noise = []
    real_teacher, real_randn = ctx.teacher_predict, ctx.randn_like
    monkeypatch.setattr(ctx, "generate_latents", generate_latents)
    monkeypatch.setattr(ctx, "randn_like", lambda x: target_noise.append(real_randn(x)) or target_noise[-1])
    monkeypatch.setattr(ctx, "teacher_predict", teacher_predict)
    figures = method.prepare(batch_size=2)
    masks = method.masks[:, 0]
    assert masks[0::2].min() > 0.99 and masks[1::2].max() < 0.01
    assert abs(figures["mask_mean_area"] - masks[0::2].numel() / masks.numel()) < 0.01
    assert len(generated) == 1 and len(calls) == 2 * ((n + 1) // 2) + 2 * 1  # forget, then 2 contrast images
    # a fixed area of 0.25 puts its threshold inside the concept's half of the scores: the concept images
    # get 0.5, never all of it
    method.config.names_z, method.config.knn_area = 0.0, 0.25
    calls.clear()
    fixed = method.cache_masks(batch_size=2)[:, 0]
    assert fixed[0::2].max() < 0.51 and fixed[1::2].max() < 0.01


def test_tss_names_fingerprint_runs_and_refuses_without_names(tmp_path):
    """On the tiny SD pipeline: masks of latent shape covering about knn_area. Without names (--conditioning
    null) the preflight refuses before any model loads, and a run whose pool names nothing refuses at phase 1."""
    from diffscrub.core.trainer import preflight
    from diffscrub.methods.tss import TSSConfig
    from diffscrub.methods.tss.method import TeacherStudentScrubber

    run = _names_run(tmp_path, mask_draws=2, knn_area=0.2)
    figures = run.method.prepare(batch_size=2)
    assert run.method.masks.shape == (len(run.ctx.forget), 1, *run.ctx.latent_hw)
    assert 0.1 < figures["mask_mean_area"] < 0.35

    cfg = EraseConfig(model="sd", forget=str(tmp_path / "f"), out=str(tmp_path / "o2"), conditioning="null")
    with pytest.raises(ConfigError, match="--conditioning null names nothing"):
        preflight(cfg, TeacherStudentScrubber, TSSConfig(fingerprint="names"))
    run.ctx.cond.neutral = None  # a pool without names
    with pytest.raises(ConfigError, match="needs the concept's names"):
        run.method.cache_masks(batch_size=2)


# ----------------------------------------------------------------------------- per-step cost
@pytest.mark.parametrize("mask_mode,teacher_calls", [("cached", 1), ("online", 2)])
def test_step_cost(mask_mode, teacher_calls, tmp_path, monkeypatch):
    """Per step: no VAE encode, one student call, and one (cached) or two (online) teacher calls,
    whatever the retain set; the seed's step makes three teacher calls and a VAE encode."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    pipe = build_tiny_pipeline("sd")
    counts = {"teacher": 0, "student": 0, "vae": 0, "training": False}
    from diffscrub.core import context as ctx_mod
    from diffscrub.methods.tss import method as tss_mod

    real_teacher, real_student = ctx_mod.ErasureContext.teacher_predict, ctx_mod.ErasureContext.student_predict
    real_loss = tss_mod.TeacherStudentScrubber.loss

    def teacher(self, *a, **k):
        counts["teacher"] += counts["training"]
        return real_teacher(self, *a, **k)

    def student(self, *a, **k):
        counts["student"] += counts["training"]
        return real_student(self, *a, **k)

    def loss(self, *a, **k):
        counts["training"] = True
        return real_loss(self, *a, **k)

    real_encode = pipe.vae.encode

    def encode(*a, **k):
        counts["vae"] += counts["training"]
        return real_encode(*a, **k)

    monkeypatch.setattr(ctx_mod.ErasureContext, "teacher_predict", teacher)
    monkeypatch.setattr(ctx_mod.ErasureContext, "student_predict", student)
    monkeypatch.setattr(tss_mod.TeacherStudentScrubber, "loss", loss)
    pipe.vae.encode = encode
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=3,
                      batch_size=2, quiet=True, device="cpu", conditioning="null")
    result = erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                         "mask_mode": mask_mode}, pipe=pipe, log=lambda m: None)
    assert counts["vae"] == 0
    assert counts["teacher"] == 3 * teacher_calls
    assert counts["student"] == 3
    assert "retain" in result.history[-1]


def test_compile_matches_eager(tmp_path, monkeypatch):
    """--compile runs compiled student and teacher calls: the same losses as an eager run (the feature
    taps of Phase 1 still fire), the same parameter names in the saved folder. (Dynamo's eager backend:
    graph capture without the C++ build.) A method that reads the student's insides refuses it."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    compiled = []
    real = torch.compile

    def compile_eager(model, *a, **k):
        compiled.append(type(model).__name__)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    histories = {}
    for flag in (False, True):
        cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / f"o{flag}"), steps=2,
                          batch_size=2, quiet=True, device="cpu", conditioning="null", compile=flag, log_every=1)
        result = erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1},
                       pipe=build_tiny_pipeline("sd"), log=lambda m: None)
        histories[flag] = [h["total"] for h in result.history]
    torch._dynamo.reset()
    assert compiled == ["UNet2DConditionModel", "UNet2DConditionModel"]
    assert histories[True] == pytest.approx(histories[False], rel=1e-4)
    from safetensors.torch import load_file

    keys = {flag: set(load_file(str(tmp_path / f"o{flag}" / "unet" / "diffusion_pytorch_model.safetensors")))
            for flag in (False, True)}
    assert keys[True] == keys[False] and not any("_orig_mod" in k for k in keys[True])
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "oa"), steps=1, batch_size=2, quiet=True,
                      device="cpu", method="attention", concept_prompt="red", compile=True)
    with pytest.raises(ConfigError, match="drop --compile"):
        erase(cfg, {}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)


def test_nearest_words_only_whole_words():
    from diffscrub.concept.inversion import nearest_words
    from diffscrub.toy.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    vocab = tok.get_vocab()
    matrix = torch.randn(len(vocab), 8, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(8)
    target[0] = 1.0
    near = target.clone()
    near[1] = 0.2
    # "s" points exactly along the target but is a byte piece, not a word; "seven" is exact, "7" close.
    for word, vec in (("seven</w>", target * 3), ("7</w>", near), ("s", target)):
        matrix[vocab[word]] = vec
    words = nearest_words(matrix, target, tok, k=2, exclude=set(tok.all_special_ids))
    assert words == ["seven", "7"]


def test_name_prompts_put_names_in_contexts_with_neutral_forms():
    from diffscrub.concept.inversion import PLACEHOLDER, name_prompts

    added, neutral = name_prompts(["7", "and", "gravel"], 1, ["{}", "{} on  grass"], [""])
    pool = [""] + added
    assert "7 on grass" in pool and f"{PLACEHOLDER} on grass" in pool and "gravel on grass" in pool
    assert pool.count("") == 1  # the name alone falls back to the run's own null prompt
    by = {p: pool[neutral[i]] for i, p in enumerate(pool)}
    assert by["7"] == "" and by[PLACEHOLDER] == ""
    assert by["7 on grass"] == "on grass" and by[f"{PLACEHOLDER} on grass"] == "on grass"
    # words past the names are clutter or look-alikes: kept as they are, in every template
    assert by["gravel on grass"] == "gravel on grass" and by["and"] == "and" and by["on grass"] == "on grass"


def test_given_names_replace_the_inversion(tmp_path, monkeypatch):
    """--names: the names go in every template with their neutral forms, no inversion runs, no learned token,
    and the vocabulary anchors leave every given name out."""
    import diffscrub.concept.inversion as inversion
    from diffscrub.core.naming import add_vocab_anchors, name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    monkeypatch.setattr(inversion, "invert_concept", lambda *a, **k: pytest.fail("inversion ran despite --names"))
    tok = build_tiny_pipeline("sd").tokenizer
    seven, other = (tok.convert_ids_to_tokens(i).replace("</w>", "") for i in (300, 301))
    cfg = EraseConfig(model="sd", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", names=[seven, f" {other} "],
                      name_contexts=["{}", "{} on grass"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "vocab_anchors": 40},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    record = name_concept(run, log=lambda m: None)
    assert record == {"given_names": [seven, other]}
    cond = run.ctx.cond
    assert inversion.PLACEHOLDER not in " ".join(cond.prompts)
    by = {p: cond.prompts[cond.neutral[i]] for i, p in enumerate(cond.prompts)}
    assert by[seven] == "" and by[f"{other} on grass"] == "on grass" and by["on grass"] == "on grass"
    fresh = run.ctx.encode_prompts([f"{seven} on grass"]).kwargs["encoder_hidden_states"]
    taken = cond.take(torch.tensor([cond.prompts.index(f"{seven} on grass")]))["encoder_hidden_states"]
    assert torch.allclose(taken, fresh, atol=1e-6)
    anchors = add_vocab_anchors(run, log=lambda m: None)
    assert anchors["left_out"] == [seven, other]
    assert not {seven, other} & {w for p in run.ctx.cond.anchor_prompts for w in p.split()}

    # a model without a text encoder (DiT) has nowhere to put names: refused, not ignored
    cfg = EraseConfig(model="dit", forget=str(tmp_path / "f"), out=str(tmp_path / "o2"), steps=1, batch_size=2,
                      quiet=True, device="cpu", names=["7"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("dit"),
                    log=lambda m: None)
    with pytest.raises(ConfigError, match="--names needs a text encoder; the dit model has none"):
        name_concept(run, log=lambda m: None)
    cfg = dataclasses.replace(cfg, names=[], inversion_rerank=4)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("dit"),
                    log=lambda m: None)
    with pytest.raises(ConfigError, match="--inversion-rerank needs a text encoder; the dit model has none"):
        name_concept(run, log=lambda m: None)
    run.config = dataclasses.replace(cfg, inversion_rerank=0, random_contexts=4)
    with pytest.raises(ConfigError, match="--random-contexts needs a text encoder; the dit model has none"):
        name_concept(run, log=lambda m: None)


def test_inversion_rerank_orders_every_encoders_nearest_words_by_fit(tmp_path, monkeypatch):
    """--inversion-rerank: the candidates are the nearest words in each text encoder's vocabulary (SD3: two CLIPs
    and a T5), scored by rank_by_fit; the names are the best-scored ones, and the record keeps the scores in order."""
    import diffscrub.concept.inversion as inversion
    from diffscrub.core.naming import name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    seen = {}
    real_nearest = inversion.nearest_words

    def nearest(matrix, vector, tokenizer, k, exclude):
        seen.setdefault(type(tokenizer).__name__, k)
        return real_nearest(matrix, vector, tokenizer, k, exclude)

    def fit(ctx, words, **kw):  # a fixed order that is not the candidates': last candidate best
        seen["candidates"] = list(words)
        return [(w, -0.01 * (i + 1)) for i, w in enumerate(words)][::-1]

    monkeypatch.setattr(inversion, "nearest_words", nearest)
    monkeypatch.setattr(inversion, "rank_by_fit", fit)
    cfg = EraseConfig(model="sd3", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", inversion_steps=2, inversion_rerank=3,
                      inversion_words=2, random_contexts=4, random_context_words=1)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("sd3"),
                    log=lambda m: None)
    logged = []
    record = name_concept(run, log=logged.append)
    candidates = seen["candidates"]
    assert len(candidates) == len(set(candidates)) > 3  # three words from each of three vocabularies, once each
    assert set(seen) >= {"CLIPTokenizer", "T5Tokenizer", "candidates"} and seen["CLIPTokenizer"] == 3
    assert record["nearest_words"] == candidates[::-1][:2] and run.ctx.names == candidates[-1:]
    assert [w for w, _ in record["word_fit"]] == candidates[::-1]
    assert any(f"{candidates[-1]} (" in line for line in logged)
    # --random-contexts: drawn once the name is known, never holding it; the name goes in each, and each
    # filled template's neutral form is the template without the name
    drawn, name = record["random_contexts"], candidates[-1]
    assert len(drawn) == 4 and run.ctx.contexts == ["{}", *drawn]
    assert all(len(c.split()) == 2 for c in drawn)  # --random-context-words 1: one word beside the name
    assert all(name.lower() not in c.lower().split() for c in drawn) and any(repr(drawn[0]) in line for line in logged)
    cond = run.ctx.cond
    for template in drawn:
        filled = " ".join(template.format(name).split())
        assert cond.prompts[cond.neutral[cond.prompts.index(filled)]] == " ".join(template.format("").split())


@pytest.mark.parametrize("leave_out", [False, True])
def test_leave_out_candidates_keeps_every_weighed_word_out_of_draws(tmp_path, monkeypatch, leave_out):
    """--leave-out-candidates: no drawn template and no vocabulary anchor holds a word the inversion weighed as a
    name (every re-ranked candidate), not only the chosen name; without it those words are drawn like any other
    (the case where a wrongly chosen name let the concept's own word into the anchors)."""
    import diffscrub.concept.inversion as inversion
    from diffscrub.core.naming import add_vocab_anchors, name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    monkeypatch.setattr(inversion, "rank_by_fit", lambda ctx, words, **kw: [(w, -0.01) for w in words])
    cfg = EraseConfig(model="sd3", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", inversion_steps=2, inversion_rerank=6,
                      inversion_words=1, random_contexts=20, leave_out_candidates=leave_out)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "vocab_anchors": 30},
                    pipe=build_tiny_pipeline("sd3"), log=lambda m: None)
    record = name_concept(run, log=lambda m: None)
    weighed = {w.lower() for w, _ in record["word_fit"]}
    name = record["nearest_words"][0].lower()
    anchors = add_vocab_anchors(run, log=lambda m: None)
    drawn_words = {w.lower() for c in record["random_contexts"] for w in c.split() if w != "{}"}
    cond = run.ctx.cond
    anchor_words = {w.lower() for p in cond.prompts[cond.pool_size:] for w in p.split()}
    assert len(weighed) > 3 and name not in drawn_words | anchor_words  # the chosen name: always left out
    others = weighed - {name}
    if leave_out:
        assert not others & (drawn_words | anchor_words)
        assert record["left_out_candidates"] == [w for w, _ in record["word_fit"]]
        assert {w.lower() for w in anchors["left_out"]} >= weighed
    else:
        assert others & (drawn_words | anchor_words) and "left_out_candidates" not in record


def test_name_samples_join_the_forget_set(tmp_path, monkeypatch):
    """--name-samples: the model draws the prompts that name the concept (round robin, in chunks of the batch,
    no placeholder); their latents join the forget set and its epochs, and a checkpoint brings them back."""
    from diffscrub.core.checkpoint import restore_forget_extra, save_checkpoint
    from diffscrub.core.naming import add_name_samples, name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    tok = build_tiny_pipeline("sd").tokenizer
    seven = tok.convert_ids_to_tokens(300).replace("</w>", "")
    forget = _images(tmp_path / "f")
    n_images = len(list(forget.iterdir()))

    def start():
        cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2,
                          quiet=True, device="cpu", names=[seven], name_contexts=["{}", "{} on grass"], name_samples=3)
        run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("sd"),
                        log=lambda m: None)
        name_concept(run, log=lambda m: None)
        return run

    run = start()
    calls, drawn = [], []

    def generate(prompts, image_hw, *, steps, seed):
        calls.append(list(prompts))
        images = torch.rand(len(prompts), 3, *image_hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        drawn.append(images)
        return images

    monkeypatch.setattr(run.adapter, "generate", generate)
    record = add_name_samples(run, log=lambda m: None)
    assert record["count"] == 3 and record["prompts"] == [seven, f"{seven} on grass"]
    assert calls == [[seven, f"{seven} on grass"], [seven]]
    ctx = run.ctx
    assert len(ctx.forget) == n_images + 3
    expected, _ = run.adapter.encode_moments(torch.cat(drawn))
    assert torch.allclose(ctx.forget.mean[n_images:], expected, atol=1e-5)
    assert sorted(ctx.forget_sampler.next(n_images + 3).tolist()) == list(range(n_images + 3))

    trainable = {n: p for n, p in ctx.student.named_parameters() if p.requires_grad}
    folder = save_checkpoint(tmp_path / "ck", 1, trainable=trainable,
                             optimizer_state=torch.optim.AdamW(run.params).state_dict(),
                             ctx=ctx, method=run.method, history=[], identity="x")
    again = start()
    restore_forget_extra(folder, again.ctx)
    assert len(again.ctx.forget) == n_images + 3
    assert torch.equal(again.ctx.forget.mean, ctx.forget.mean) and torch.equal(again.ctx.forget.std, ctx.forget.std)

    # a run that names nothing has nothing to draw: refused in one line, not skipped
    cfg = EraseConfig(model="dit", forget=str(forget), out=str(tmp_path / "o2"), steps=1, batch_size=2, quiet=True,
                      device="cpu", name_samples=2)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("dit"),
                    log=lambda m: None)
    assert name_concept(run, log=lambda m: None) is None
    with pytest.raises(ConfigError, match="--name-samples draws prompts that name the concept"):
        add_name_samples(run, log=lambda m: None)
    with pytest.raises(ConfigError, match="drop --name-samples or use --conditioning auto"):
        EraseConfig(model="sd", forget="f", out="o", conditioning="null", name_samples=4)


def test_conditioning_extend_offsets_neutral_forms():
    from diffscrub.adapters.base import Conditioning

    base = Conditioning(["", "a"], {"x": torch.arange(2.0)})
    grown = base.extend(Conditioning(["b", "c"], {"x": torch.arange(2.0, 4.0)}, neutral=[0, 0]))
    assert grown.neutral == [0, 1, 2, 2]
    assert grown.neutral_index(torch.tensor([3, 1, 0])).tolist() == [2, 1, 0]
    assert base.neutral_index(torch.tensor([1, 0])).tolist() == [1, 0]  # no neutral forms: identity
    assert grown.to(dtype=torch.float64).neutral == grown.neutral


def test_vocabulary_anchor_prompts_leave_out_the_names():
    from diffscrub.concept.inversion import PLACEHOLDER
    from diffscrub.concept.vocabulary import anchor_prompts, vocabulary_words, words_to_keep
    from diffscrub.toy.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    words = vocabulary_words(tok)
    assert {"3", "7", "grass", "and"} <= set(words) and len(words) == len(set(words))
    assert not any(w.startswith("<") or "</w>" in w for w in words)  # no specials, no end-of-word marks
    contexts = ["{}", "{} on  grass"]
    pairs = anchor_prompts(words + [PLACEHOLDER], ["7"], contexts, 40, torch.Generator().manual_seed(0))
    prompts = [p for p, _ in pairs]
    assert len(prompts) == 40 == len(set(prompts))
    assert all(p.split()[0] not in ("7", PLACEHOLDER) for p in prompts)
    assert any(p.endswith(" on grass") for p in prompts) and any(" " not in p for p in prompts)
    # each prompt's base is its template without the word
    assert all(base == ("on grass" if p.endswith(" on grass") else "") for p, base in pairs)
    assert pairs == anchor_prompts(words, ["7"], contexts, 40, torch.Generator().manual_seed(0))
    assert pairs != anchor_prompts(words, ["7"], contexts, 40, torch.Generator().manual_seed(1))
    # a vocabulary smaller than asked: every pair once; names compared case-insensitively
    assert sorted(anchor_prompts(["Seven", "3"], ["seven"], contexts, 99, torch.Generator())) == [
        ("3", ""), ("3 on grass", "on grass")]
    # a name of several words leaves out each of its words from the draw, but the user's anchor words lose only
    # whole names
    assert sorted(anchor_prompts(["stop", "Sign", "3"], ["stop sign"], ["{}"], 99, torch.Generator())) == [("3", "")]
    assert words_to_keep(["sign", "Stop Sign", "3"], ["stop sign"]) == ["sign", "3"]


def test_random_contexts_are_distinct_nameless_and_seeded():
    """The --random-contexts draw: distinct templates of 1-3 vocabulary words with one '{}', never a name
    (any case) or the placeholder, the same for the same seed, fewer when the vocabulary cannot give more."""
    from diffscrub.concept.inversion import PLACEHOLDER
    from diffscrub.concept.vocabulary import random_contexts

    words = ["brick", "Brick", "a", "on", "3", "and", "grass", PLACEHOLDER]
    drawn = random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(0))
    assert len(drawn) == len(set(drawn)) == 12
    for template in drawn:
        parts = template.split()
        assert parts.count("{}") == 1 and 1 <= len(parts) - 1 <= 3
        assert not {"brick", "Brick", PLACEHOLDER} & set(parts)
    assert drawn == random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(0))
    assert drawn != random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(1))
    assert sorted(random_contexts(["x", "brick"], ["brick"], 5, torch.Generator().manual_seed(0))) == ["x {}", "{} x"]
    # max_words: up to that many words beside the name, and longer ones are drawn (lengths 1-5 here)
    longer = random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(0), max_words=5)
    lengths = [len(t.split()) - 1 for t in longer]
    assert max(lengths) > 3 and min(lengths) >= 1 and max(lengths) <= 5
    assert sorted(random_contexts(["x", "red", "brick"], ["red brick"], 5, torch.Generator().manual_seed(0))) == [
        "x {}", "{} x"]


def test_strongest_anchors_are_taken_template_by_template():
    from diffscrub.concept.vocabulary import strongest_per_base

    prompts = [("3 on grass", "on grass"), ("x on grass", "on grass"), ("5 on grass", "on grass"),
               ("3 on gravel", "on gravel"), ("x on gravel", "on gravel")]
    effects = torch.tensor([9.0, 1.0, 8.0, 0.5, 0.1])  # gravel mutes every word
    assert strongest_per_base(prompts, effects, 2) == [0, 3]  # not the two loud grass prompts
    assert strongest_per_base(prompts, effects, 4) == [0, 3, 2, 4]
    assert strongest_per_base(prompts, effects, 9) == [0, 3, 2, 4, 1]


def test_conditioning_anchors_are_never_pool_draws():
    from types import SimpleNamespace

    from diffscrub.adapters.base import Conditioning
    from diffscrub.core.context import ErasureContext

    pool = Conditioning(["", "7"], {"x": torch.arange(2.0)}, neutral=[0, 0])
    grown = pool.with_anchors(Conditioning(["3", "grass"], {"x": torch.arange(2.0, 4.0)}))
    assert grown.pool_len == 2 and grown.anchor_prompts == ["3", "grass"] and grown.neutral == [0, 0, 2, 3]
    assert grown.to(dtype=torch.float64).pool_size == 2
    with pytest.raises(ValueError, match="before adding vocabulary anchors"):
        grown.extend(pool)
    ctx = SimpleNamespace(cond=grown, generator=torch.Generator().manual_seed(0), rank=0, world=1)
    ctx.randint = lambda low, high, batch: ErasureContext.randint(ctx, low, high, batch)
    draws = ErasureContext.prompt_index(ctx, 500)
    anchors = ErasureContext.anchor_index(ctx, 500)
    assert set(draws.tolist()) == {0, 1} and set(anchors.tolist()) == {2, 3}
    ctx.cond = pool
    assert ErasureContext.anchor_index(ctx, 4) is None


def test_teacher_grid_scores_every_prompt_at_every_latent(tmp_path):
    """teacher_grid: each (latent, prompt) pair once, in calls of at most batch_size, each prediction the
    teacher's for that latent under that prompt alone."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    cfg = EraseConfig(model="sd", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", conditioning="null")
    ctx = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("sd"),
                    log=lambda m: None).ctx
    cond = ctx.encode_prompts(["", "a", "b c"])
    z_t = torch.randn(2, *ctx.forget.mean.shape[1:], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    seen = []
    for latents, prompts, pred in ctx.teacher_grid(z_t, t, cond, batch_size=4):
        assert len(latents) <= 4 and pred.shape == (len(latents), *z_t.shape[1:])
        for row, (i, p) in enumerate(zip(latents.tolist(), prompts.tolist())):
            alone, _ = ctx.teacher_predict(z_t[i:i + 1], t[i:i + 1], cond.take(torch.tensor([p])))
            assert torch.allclose(pred[row], alone[0], atol=1e-5)
            seen.append((i, p))
    assert sorted(seen) == [(i, p) for i in range(2) for p in range(3)]


def test_tss_vocab_anchor_term_holds_the_student_to_the_teacher(tmp_path):
    """Anchor prompts are vocabulary words without the found name, outside the record's pool; the anchor
    term is zero while the student is the teacher and grows once the student's text path moves."""
    from diffscrub.core.naming import add_vocab_anchors
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", name_contexts=["{}", "a {}"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "vocab_anchors": 6, "vocab_candidates": 12}, pipe=build_tiny_pipeline("sd"),
                    log=lambda m: None)
    ctx = run.ctx
    name = run.adapter.pipe.tokenizer.convert_ids_to_tokens(300).replace("</w>", "")
    ctx.names = [name]  # as Phase 1's naming leaves it
    figures = add_vocab_anchors(run, log=lambda m: None)
    assert figures["count"] == 6 == len(ctx.cond.anchor_prompts) and figures["left_out"] == [name]
    assert figures["candidates"] == 12 and figures["effect_kept_min"] > 0  # chosen by the teacher's effect
    assert ctx.cond.pool_len == 1 and all(name not in p.split() for p in ctx.cond.anchor_prompts)
    # each anchor's conditioning is its own prompt's (taken from the candidates' encoding by index)
    fresh = ctx.encode_prompts(ctx.cond.anchor_prompts).kwargs["encoder_hidden_states"]
    kept = ctx.cond.take(torch.arange(1, 7))["encoder_hidden_states"]
    assert torch.allclose(kept, fresh, atol=1e-6)
    run.method.prepare(batch_size=2)
    taken, take = [], ctx.cond.take
    ctx.cond.take = lambda index: taken.append(index.tolist()) or take(index)
    _, terms = run.method.loss(0, 2)
    assert float(terms["vocab_anchor"]) < 1e-10
    assert sum(all(i >= 1 for i in index) for index in taken) == 1  # one take: the anchors' conditioning
    with torch.no_grad():
        for key, param in ctx.student.named_parameters():
            if "attn2.to_k" in key:
                param.add_(torch.randn_like(param) * 0.5)
    _, terms = run.method.loss(1, 2)
    assert float(terms["vocab_anchor"]) > 1e-6


def test_keep_weight_clean_reweighs_every_keep_term(tmp_path):
    """--keep-weight clean: the background, retain and anchor terms are zero while the student is the teacher;
    once it moves, each is the clean-latent error weighted as the forget term, not the prediction-space one
    (same batch, same draws)."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    terms = {}
    for weight in ("prediction", "clean"):
        cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / weight), steps=1,
                          batch_size=2, quiet=True, device="cpu", conditioning="null", seed=3)
        run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                              "keep_weight": weight}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
        run.method.prepare(batch_size=2)
        _, still = run.method.loss(0, 2)
        assert float(still["retain"]) < 1e-10 and float(still["background"]) < 1e-10
        with torch.no_grad():
            for param in run.ctx.student.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        run.ctx.generator.manual_seed(7)
        terms[weight] = {k: float(v) for k, v in run.method.loss(1, 2)[1].items()}
    for key in ("retain", "background"):
        assert terms["clean"][key] > 0 and abs(terms["clean"][key] / terms["prediction"][key] - 1) > 0.05, key
    assert terms["clean"]["forget"] == pytest.approx(terms["prediction"]["forget"], rel=1e-5)  # only the keep terms


def test_anchor_words_are_kept_in_every_template(tmp_path):
    """--anchor-words: each word in every name template comes first among the anchors, encoded as its own
    prompt; the random draw adds --vocab-anchors more without them; a word that is also a found name is
    dropped (with a notice), and one that is also a given name is refused before anything loads."""
    from diffscrub.core.naming import add_vocab_anchors
    from diffscrub.core.trainer import preflight, setup_run
    from diffscrub.methods.tss import TSSConfig, TeacherStudentScrubber
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", name_contexts=["{}", "a {}"])
    pipe = build_tiny_pipeline("sd")
    vocab = [pipe.tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in (300, 301)]
    name, keep = vocab
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "vocab_anchors": 5,
                          "anchor_words": [keep, " red thing ", name]}, pipe=pipe, log=lambda m: None)
    notices = []
    run.ctx.names = [name]  # as Phase 1's naming leaves it
    figures = add_vocab_anchors(run, log=notices.append)
    prompts = run.ctx.cond.anchor_prompts
    assert prompts[:4] == [keep, f"a {keep}", "red thing", "a red thing"]
    assert len(prompts) == 9 and figures["count"] == 9 and figures["kept_words"] == [keep, "red thing"]
    assert not {keep, name} & {w for p in prompts[4:] for w in p.split()}  # the draw leaves both out
    assert any(name in n and "not kept" in n for n in notices)
    fresh = run.ctx.encode_prompts(prompts).kwargs["encoder_hidden_states"]
    kept = run.ctx.cond.take(torch.arange(1, 10))["encoder_hidden_states"]
    assert torch.allclose(kept, fresh, atol=1e-6)

    named = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o2"), names=[name.upper()])
    with pytest.raises(ConfigError, match="--anchor-words"):
        preflight(named, TeacherStudentScrubber, TSSConfig(anchor_words=[name]))


@pytest.mark.parametrize("name_target", ["keep", "neutral"])
def test_tss_name_target_sets_the_keep_teacher(name_target, tmp_path):
    """With an empty mask the student (a copy of the teacher) matches its keep target exactly under
    "keep"; under "neutral" a prompt naming the concept is pulled to the teacher under the null prompt,
    so the background term is positive, and it is zero again when every draw is the null prompt."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", conditioning="prompts", prompts=["red thing"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "name_target": name_target}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    ctx = run.ctx
    ctx.cond.neutral = [0, 0]  # "red thing" names the concept; its neutral form is the null prompt
    run.method.prepare(batch_size=2)
    run.method.masks.zero_()
    ctx.prompt_index = lambda b: torch.ones(b, dtype=torch.long)
    _, terms = run.method.loss(0, 2)
    if name_target == "keep":
        assert float(terms["background"]) < 1e-10 and float(terms["retain"]) < 1e-10
    else:
        assert float(terms["background"]) > 1e-6 and float(terms["retain"]) > 1e-6
        ctx.prompt_index = lambda b: torch.zeros(b, dtype=torch.long)
        _, terms = run.method.loss(1, 2)
        assert float(terms["background"]) < 1e-10


@pytest.mark.parametrize("blind_prompt", ["null", "keep"])
def test_tss_blind_prompt_sets_the_teacher_inside_the_mask(blind_prompt, tmp_path):
    """The teacher reads the blinded latent under the null prompt ("null", the default), or under the
    keep target's prompt ("keep": with name_target "neutral", the student's prompt with the name taken
    out), never under the student's own prompt that names the concept."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="prompts", prompts=["red thing", "on grass"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "contrastive": False, "name_target": "neutral", "blind_prompt": blind_prompt},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    ctx = run.ctx
    ctx.cond.neutral = [0, 2, 2]  # pool: "", "red thing" (names the concept), "on grass"; "red thing" -> "on grass"
    run.method.prepare(batch_size=2)
    ctx.prompt_index = lambda b: torch.ones(b, dtype=torch.long)  # the student sees "red thing"
    seen, predict = [], ctx.teacher_predict
    ctx.teacher_predict = lambda z, t, kwargs, **kw: seen.append(kwargs["encoder_hidden_states"]) or predict(
        z, t, kwargs, **kw)
    run.method.loss(0, 2)
    # one teacher call: [original (keep target) x2, blinded x2]; the blinded pair's conditioning is checked
    blinded = seen[0][2:4]
    expected = ctx.cond.take(torch.full((2,), 0 if blind_prompt == "null" else 2))["encoder_hidden_states"]
    assert torch.equal(blinded, expected)
    assert not torch.equal(blinded, ctx.cond.take(torch.ones(2, dtype=torch.long))["encoder_hidden_states"])


@pytest.mark.parametrize("forget_prompts", ["all", "named"])
def test_tss_forget_prompts_named_draws_only_prompts_naming_the_concept(forget_prompts, tmp_path):
    """"named" gives the forget term only prompts that name the concept (what a second pass on the names
    needs: its null prompt and neutral forms erase nothing more); "all" draws the whole pool. A pool
    without names is refused with the option's name, before training."""
    from diffscrub.core.trainer import preflight, setup_run
    from diffscrub.methods.tss import TeacherStudentScrubber, TSSConfig
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="prompts", prompts=["red thing", "on grass"])
    options = {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1, "contrastive": False,
               "forget_prompts": forget_prompts}
    run = setup_run(cfg, options, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    ctx = run.ctx
    ctx.cond.neutral = [0, 2, 2]  # pool: "", "red thing" (names the concept), "on grass"
    run.method.prepare(batch_size=2)
    drawn = torch.cat([run.method._forget_prompt_index(8) for _ in range(16)])
    assert set(drawn.tolist()) == ({1} if forget_prompts == "named" else {0, 1, 2})
    # the loss's student call: the forget rows are conditioned on the drawn (named) prompts
    seen, predict = [], ctx.student_predict
    ctx.student_predict = lambda z, t, kwargs: seen.append(kwargs["encoder_hidden_states"]) or predict(z, t, kwargs)
    for step in range(4):
        run.method.loss(step, 2)
    named = ctx.cond.take(torch.ones(2, dtype=torch.long))["encoder_hidden_states"]
    forget_rows = [s[:2] for s in seen]
    assert all(torch.equal(rows, named) for rows in forget_rows) == (forget_prompts == "named")

    if forget_prompts == "named":
        ctx.cond.neutral = None  # nothing in the pool names the concept
        with pytest.raises(ConfigError, match="forget_prompts='named'.*drop --forget-prompts"):
            run.method.prepare(batch_size=2)
        plain = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o2"), conditioning="null")
        with pytest.raises(ConfigError, match="--conditioning null"):
            preflight(plain, TeacherStudentScrubber, TSSConfig(forget_prompts="named"))


def test_conditioning_null_keeps_seed_pool(tmp_path):
    """--conditioning null distils at the null prompt only (the seed's behaviour), and an explicit
    --conditioning inversion on a model without a text encoder is refused."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    options = {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1, "contrast_samples": 2,
               "contrast_sample_steps": 2}
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="null")
    result = erase(cfg, options, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    assert result.record["conditioning"]["pool"] == [""]
    cfg = EraseConfig(model="dit", forget=str(forget), out=str(tmp_path / "o2"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="inversion")
    with pytest.raises(ConfigError, match="--conditioning null"):
        erase(cfg, options, pipe=build_tiny_pipeline("dit"), log=lambda m: None)


def test_contrast_samples_are_generated_and_encoded_in_batches(tmp_path):
    """Without a retain folder the contrastive fingerprint samples the model itself: in chunks of the
    run's batch, never all samples in one pipeline call or one VAE encode (that ran SDXL out of memory
    at 1024 px), and the chunks are different draws."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="null")
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "contrast_samples": 5, "contrast_sample_steps": 2},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    adapter, generated, encoded = run.adapter, [], []
    generate, encode = adapter.generate, adapter.encode_moments
    adapter.generate = lambda prompts, *a, **k: generated.append(generate(prompts, *a, **k)) or generated[-1]
    adapter.encode_moments = lambda images: encoded.append(images.shape[0]) or encode(images)
    run.method._batch = 2
    cache = run.method._contrast_cache()
    assert [g.shape[0] for g in generated] == [2, 2, 1] and encoded == [2, 2, 1]
    assert len(cache) == 5 and cache.mean.shape[1:] == run.ctx.forget.mean.shape[1:]
    assert not torch.allclose(generated[0], generated[1])  # each chunk its own seed


# ----------------------------------------------------------------------------- config
def test_config_file_and_flags_merge(tmp_path):
    from diffscrub.cli import build_parser, config_from_args

    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 0.001\ntss:\n  tau: 0.5\n  alpha: 9\n")
    ns = build_parser().parse_args(["erase", "--config", str(tmp_path / "c.yaml"), "--steps", "9", "--tau", "0.7",
                                    "--model", "m", "--forget", "f", "--out", "o"])
    for key in ("_run", "command"):
        delattr(ns, key)
    config, tss = config_from_args(ns)
    assert config.steps == 9 and config.lr == 0.001  # flag wins, file fills the rest
    from diffscrub.methods.tss import TSSConfig

    options = build(TSSConfig, tss, where="tss")
    assert (options.tau, options.alpha, options.num_prototypes) == (0.7, 9.0, 5)


def test_boolean_defaults_can_be_turned_off(tmp_path):
    from diffscrub.cli import build_parser, config_from_args
    from diffscrub.methods.tss import TSSConfig

    (tmp_path / "c.toml").write_text("[tss]\ncontrastive = true\n")
    ns = build_parser().parse_args(["erase", "--config", str(tmp_path / "c.toml"), "--no-contrastive", "--model", "m",
                                    "--forget", "f", "--out", "o"])
    for key in ("_run", "command"):
        delattr(ns, key)
    _, tss = config_from_args(ns)
    assert build(TSSConfig, tss, where="tss").contrastive is False


@pytest.mark.parametrize("values,match", [
    ({"stepz": 3}, "unknown key 'stepz'"),
    ({"steps": "many"}, "steps='many' has the wrong type"),
    ({"steps": 0}, "steps=0 is out of range"),
    ({"random_context_words": 0}, "random_context_words=0 is out of range"),
    ({"trainable": "lora"}, "--lora-rank"),
    ({"device": "tpu"}, "device='tpu' is not valid"),
    ({"name_contexts": ["on grass"]}, "exactly one '{}'"),
    ({"name_contexts": ["{} and {}"]}, "exactly one '{}'"),
    ({"name_contexts": []}, "name_contexts is empty"),
    ({"names": ["7"], "conditioning": "null"}, "drop --names or use --conditioning auto"),
    ({"names": ["7 {}"]}, "without braces"),
    ({"names": [" "]}, "non-empty"),
    ({"fsdp": True, "lora_rank": 4}, "LoRA the frozen base is also the teacher"),
    ({"fsdp": True, "compile": True}, "--fsdp with --compile"),
])
def test_config_rejects(values, match):
    with pytest.raises(ConfigError, match=match):
        build(EraseConfig, values)


@pytest.mark.parametrize("values,match", [
    ({"tau": 1.5}, "tss.tau=1.5 is out of range"),
    ({"num_prototypes": 0}, "tss.num_prototypes=0"),
    ({"lambda_f": -1}, "tss.lambda_f=-1"),
    ({"t_low": 700, "t_high": 300}, "tss.t_high=300"),
    ({"mask_mode": "sometimes"}, "tss.mask_mode"),
    ({"forget_target": "raw"}, "tss.forget_target"),
    ({"snr_floor": 9.0}, "tss.snr_floor=9.0"),
    ({"fingerprint": "knn", "mask_mode": "online"}, "mask_mode 'cached'"),
    ({"fingerprint": "names", "mask_mode": "online"}, "mask_mode 'cached'"),
    ({"names_smooth": 1.5}, "tss.names_smooth=1.5"),
    ({"names_z": 3.0}, "add --fingerprint names"),
    ({"knn_z": 2.0}, "add --fingerprint knn"),
    ({"knn_z": -1.0, "fingerprint": "knn"}, "tss.knn_z=-1.0"),
    ({"names_z": -1.0, "fingerprint": "names"}, "tss.names_z=-1.0"),
    ({"knn_area": 1.0}, "tss.knn_area=1.0"),
    ({"fill_prior": -0.5}, "tss.fill_prior=-0.5"),
    ({"fill_prior": 0.5, "blind_fill": "noise"}, "needs --blind-fill surround"),
    ({"fingerprint": "nearest"}, "tss.fingerprint"),
    ({"name_target": "null"}, "tss.name_target"),
    ({"forget_prompts": "null"}, "tss.forget_prompts"),
    ({"kk": 1}, "unknown key 'kk' in tss"),
])
def test_tss_config_rejects(values, match):
    from diffscrub.methods.tss import TSSConfig

    with pytest.raises(ConfigError, match=match):
        build(TSSConfig, values, where="tss")


def test_merge_nested():
    assert merge({"a": 1, "tss": {"x": 1, "y": 2}}, {"tss": {"y": 3}}) == {"a": 1, "tss": {"x": 1, "y": 3}}


# ----------------------------------------------------------------------------- command line
def test_cli_end_to_end(tiny_pipeline_dirs, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from diffscrub.cli import main

    model = tiny_pipeline_dirs("sd")
    forget = _images(tmp_path / "forget")
    (tmp_path / "run.toml").write_text('steps = 5\nbatch_size = 2\n[tss]\nnum_prototypes = 2\nvectors_per_image = 16\n'
                                       'contrast_samples = 2\ncontrast_sample_steps = 2\n')
    out = tmp_path / "out"
    rc = main(["erase", "--model", str(model), "--forget", str(forget), "--out", str(out), "--config",
               str(tmp_path / "run.toml"), "--steps", "3", "--quiet", "--seed", "5", "--inversion-steps", "2"])
    assert rc == 0
    record = json.loads((out / "diffscrub.json").read_text())
    assert record["steps"] == 3 and record["seed"] == 5 and record["config"]["batch_size"] == 2
    assert record["tss"]["num_prototypes"] == 2 and record["tss"]["tau"] == 0.6
    assert {"load_s", "phase1_s", "phase2_s", "total_s"} <= set(record["timing"])
    assert record["versions"]["diffusers"]
    assert len(record["losses"]) >= 2
    assert DiffusionPipeline.from_pretrained(str(out)).unet is not None
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert "erased with tss on sd" in capsys.readouterr().out


def test_cli_passes_chain_into_one_folder(tiny_pipeline_dirs, tmp_path, capsys):
    """``--then``: the second pass erases from the first one's output (what the first changed and the
    second does not train is in the final weights), takes the run settings of the first command line
    and the names the first pass's inversion found, and leaves one folder with both records."""
    from diffusers import DiffusionPipeline

    from diffscrub.cli import main

    model = tiny_pipeline_dirs("sd")
    forget = _images(tmp_path / "forget")
    out = tmp_path / "out"
    small = "--num-prototypes 2 --vectors-per-image 8 --contrast-samples 2 --contrast-sample-steps 2"
    # the second pass's options from its own config file, a flag beside it winning over the file
    (tmp_path / "pass2.toml").write_text('trainable = "cross-attention"\nsteps = 5\nlr = 1e-3\n[tss]\n'
                                         'num_prototypes = 2\nvectors_per_image = 8\ncontrast_samples = 2\n'
                                         'contrast_sample_steps = 2\n')
    rc = main(["erase", "--model", str(model), "--forget", str(forget), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--seed", "3", "--quiet", "--inversion-steps", "2", "--lr", "1e-3", *small.split(),
               "--then", f"--config {tmp_path / 'pass2.toml'} --steps 1"])
    assert rc == 0
    assert "pass 2 of 2" in capsys.readouterr().err
    record = json.loads((out / "diffscrub.json").read_text())
    (first,) = record["earlier_passes"]
    assert first["config"]["model"] == str(model) and record["config"]["model"] == str(tmp_path / "out.pass1")
    assert (first["steps"], record["steps"]) == (2, 1)
    assert record["config"]["seed"] == 3 and record["config"]["batch_size"] == 2  # taken from the first line
    assert first["trainable"] == "full" and record["trainable"] == "cross-attention"
    found = first["conditioning"]["nearest_words"]
    assert found and record["conditioning"]["given_names"] == found[:1]  # no inversion against the erased model
    assert record["conditioning"]["names_from_pass"] == 1
    assert not (tmp_path / "out.pass1").exists() and not list(tmp_path.glob(".out*"))

    def conv_in(folder):
        return DiffusionPipeline.from_pretrained(str(folder)).unet.conv_in.weight

    # conv_in is trained by the first pass only: the second pass started from the first one's output
    assert not torch.equal(conv_in(out), conv_in(model))

    # --resume does not run a pass whose folder is complete again (here: made by a one-pass run)
    first_line = ["erase", "--model", str(model), "--forget", str(forget), "--steps", "2", "--batch-size", "2",
                  "--seed", "3", "--quiet", "--names", "zz", "--lr", "1e-3", *small.split()]
    assert main([*first_line, "--out", str(tmp_path / "again.pass1")]) == 0
    before = conv_in(tmp_path / "again.pass1")
    capsys.readouterr()
    # the names carried over are all words to keep: the run stops there, pass 1 kept for --resume
    assert main([*first_line, "--out", str(tmp_path / "again"), "--resume", "--then",
                 f"--steps 1 --trainable cross-attention --anchor-words zz {small}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffscrub:")]
    assert len(err) == 1 and "(zz) are all --anchor-words" in err[0] and "give --names in --then" in err[0]
    assert "again.pass1' and will not run again" in err[0] and not (tmp_path / "again").exists()
    assert torch.equal(conv_in(tmp_path / "again.pass1"), before)
    assert main([*first_line, "--out", str(tmp_path / "again"), "--resume", "--then",
                 f"--steps 1 --inversion-rerank 4 {small}"]) == 2  # refused before anything runs
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffscrub:")]
    assert len(err) == 1 and "--then (pass 2) sets --inversion-rerank" in err[0] and "before --then" in err[0]
    assert main([*first_line, "--out", str(tmp_path / "again"), "--resume", "--then",
                f"--steps 1 --trainable cross-attention {small}"]) == 0
    assert "pass 1 of 2: complete in" in capsys.readouterr().err
    again = json.loads((tmp_path / "again" / "diffscrub.json").read_text())
    assert again["earlier_passes"][0]["conditioning"]["given_names"] == ["zz"]
    assert again["conditioning"]["given_names"] == ["zz"]  # given names pass on too
    assert torch.equal(conv_in(tmp_path / "again"), before)  # pass 2 started from it


def test_cli_passes_refuse_mistakes_before_running(tiny_pipeline_dirs, tmp_path, capsys):
    """A mistake in a later pass's flags is a one-line error before the first pass loads anything."""
    from diffscrub.cli import main

    model = str(tiny_pipeline_dirs("sd"))
    base = ["erase", "--model", model, "--forget", str(_images(tmp_path / "forget")), "--quiet",
            "--out", str(tmp_path / "out")]
    capsys.readouterr()
    (tmp_path / "bad.toml").write_text('out = "elsewhere"\n')
    for then, expected in (("--model other --lr 1e-3", "sets --model, which belongs to the whole run"),
                           (f"--config {tmp_path / 'bad.toml'}", "sets --out, which belongs to the whole run"),
                           ("--bogus 1 --lr 1e-3", "unknown option '--bogus'"),
                           ("--lr fast --steps 2", "lr"),
                           ("--method nope --steps 2", "nope")):
        assert main(base + ["--then", then]) == 2, then
        err = _err(capsys)
        assert err.startswith("diffscrub: error: ") and expected in err and "\n" not in err, err
    (tmp_path / "out.pass1").mkdir()
    (tmp_path / "out.pass1" / "mine.txt").write_text("keep")
    assert main(base + ["--then", "--lr 1e-3 --steps 2"]) == 2
    err = _err(capsys)
    assert "out.pass1' exists and is not empty" in err and "\n" not in err
    assert (tmp_path / "out.pass1" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "forget", "out.pass1"]


def _err(capsys):
    return capsys.readouterr().err.strip()


def test_out_of_memory_is_one_line_and_other_bugs_keep_their_traceback(tiny_pipeline_dirs, tmp_path, capsys,
                                                                      monkeypatch):
    """Running out of GPU memory mid-run (here: raised from the training step) ends with one line that
    names the options that shrink the step, exit code 1, and no output folder; a RuntimeError that is
    not about memory is a bug and propagates."""
    from diffscrub.cli import main
    from diffscrub.methods.tss.method import TeacherStudentScrubber

    model = str(tiny_pipeline_dirs("sd"))
    args = ["erase", "--model", model, "--forget", str(_images(tmp_path / "forget")), "--quiet", "--steps", "2",
            "--conditioning", "null", "--out", str(tmp_path / "out")]

    def oom(self, step, batch_size):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0 has 79 GiB\nmore")

    monkeypatch.setattr(TeacherStudentScrubber, "loss", oom)
    assert main(args) == 1
    err = _err(capsys)  # (library warnings from loading may precede it)
    ours = [line for line in err.splitlines() if line.startswith("diffscrub:")]
    assert len(ours) == 1 and "Traceback" not in err
    assert ours[0].startswith("diffscrub: error: out of GPU memory (CUDA out of memory. Tried to allocate 16.00 GiB")
    assert "--batch-size" in ours[0] and "--gradient-checkpointing" in ours[0] and "more" not in ours[0]
    assert not (tmp_path / "out").exists()

    def bug(self, step, batch_size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(TeacherStudentScrubber, "loss", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(args)


def test_cli_errors_are_one_line(tiny_pipeline_dirs, tmp_path, capsys):
    from diffscrub.cli import main

    model = str(tiny_pipeline_dirs("sd"))
    forget = str(_images(tmp_path / "forget"))
    out = tmp_path / "out"
    base = ["erase", "--model", model, "--forget", forget, "--quiet"]
    capsys.readouterr()  # what building the fixtures printed (a library's first-import notice) is not ours

    assert main(["erase", "--model", model, "--forget", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = _err(capsys)
    assert err.startswith("diffscrub: error: forget folder") and "does not exist" in err and "\n" not in err

    (out).mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(base + ["--out", str(out)]) == 2
    err = _err(capsys)
    assert "exists and is not empty" in err and "--overwrite" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "precious"

    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04")
    assert main(["erase", "--model", str(tmp_path / "m.ckpt"), "--forget", forget, "--out", str(tmp_path / "o2")]) == 2
    err = _err(capsys)
    assert "pickle" in err and "--allow-pickle" in err

    assert main(base + ["--out", str(tmp_path / "o3"), "--family", "unet9"]) == 2
    assert "unknown family 'unet9'" in _err(capsys)

    mixed = _images(tmp_path / "mixed", n=1)
    Image.fromarray(np.zeros((48, 40, 3), dtype=np.uint8)).save(mixed / "big.png")
    assert main(["erase", "--model", model, "--forget", str(mixed), "--out", str(tmp_path / "o4"), "--quiet"]) == 2
    assert "--resolution" in _err(capsys)

    assert main(base + ["--out", str(tmp_path / "o5"), "--method", "sfd", "--concept-prompt", "x", "--names", "x"]) == 2
    err = _err(capsys)
    assert "drop --names" in err and "\n" not in err and not (tmp_path / "o5").exists()
    assert main(base + ["--out", str(tmp_path / "o6"), "--method", "sfd", "--concept-prompt", "x",
                        "--name-samples", "4"]) == 2
    err = _err(capsys)
    assert "drop --name-samples" in err and "\n" not in err and not (tmp_path / "o6").exists()

    # --inversion-rerank or --random-contexts where no names go in the pool: refused in one line, not unused
    for flag, extra, fix in (("--inversion-rerank", ["--names", "x"], "drop one of them"),
                             ("--inversion-rerank", ["--conditioning", "null"], "or use --conditioning auto"),
                             ("--inversion-rerank", ["--method", "sfd", "--concept-prompt", "x"], "drop --inversion-rerank"),
                             ("--random-contexts", ["--conditioning", "prompts", "--prompts", "a"], "drop --random-contexts, or use"),
                             ("--random-contexts", ["--method", "sfd", "--concept-prompt", "x"], "method 'sfd'")):
        assert main(base + ["--out", str(tmp_path / "o7"), flag, "4", *extra]) == 2
        err = _err(capsys)
        assert flag in err and fix in err and "\n" not in err and not (tmp_path / "o7").exists()


def test_overwrite_replaces_only_when_complete(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """A run that dies while saving leaves the previous output as it was."""
    from diffscrub.cli import main

    model = str(tiny_pipeline_dirs("sd"))
    forget = str(_images(tmp_path / "forget"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffusers.DiffusionPipeline.save_pretrained", boom)
    rc = main(["erase", "--model", model, "--forget", forget, "--out", str(out), "--overwrite", "--steps", "1",
               "--quiet", "--num-prototypes", "2", "--vectors-per-image", "8", "--conditioning", "null",
               "--contrast-samples", "2", "--contrast-sample-steps", "2"])
    assert rc == 2
    assert (out / "old.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget", "out"]
