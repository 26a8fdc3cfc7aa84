"""Finding the concept: prototypes, contrastive selection, the k-NN and names fingerprints."""

from __future__ import annotations

import pytest
import torch

from diffscrub.concept import concept_mask, fit_prototypes
from diffscrub.adapters.base import Features
from diffscrub.config import EraseConfig
from diffscrub.errors import ConfigError
from random_images import write_random_images as _images


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
