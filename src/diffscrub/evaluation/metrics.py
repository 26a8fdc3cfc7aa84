"""Metrics as pure functions over tensors: no model, no file, no randomness that is not seeded.

Feature extractors (the toy oracle, Inception, the scrubber's detector) live elsewhere and
produce tensors; everything here turns tensors into figures and confidence intervals.

* :func:`wilson_interval` - binomial confidence interval of a rate ``k / n``.
* :func:`bootstrap_ci` - percentile bootstrap interval of any statistic, seeded.
* :func:`frechet_distance` - Fréchet distance between two feature sets (Gaussian fit).
* :func:`pixel_difference`, :func:`ssim_per_sample` - per-sample change between paired images.
* :func:`rate_summary`, :func:`mean_summary` - a figure with its interval, as a JSON-ready dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import torch

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be strictly between 0 and 1")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the rate ``k / n`` at ``confidence`` (two-sided).

    ``n == 0`` gives ``(0.0, 1.0)``: nothing is known. Unlike the normal (Wald) interval it never
    leaves [0, 1] and stays informative at ``k == 0`` or ``k == n``, which is exactly where an
    erased concept's rate should sit.
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_tuple(values) -> tuple[torch.Tensor, ...]:
    if isinstance(values, torch.Tensor):
        return (values,)
    return tuple(torch.as_tensor(v) for v in values)


def bootstrap_ci(
    values: torch.Tensor | Sequence[torch.Tensor],
    fn: Callable[..., float | torch.Tensor] | None = None,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    paired: bool = True,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(*values)``, resampling rows (dim 0) with replacement.

    Args:
        values: one tensor ``[N, ...]`` or a sequence of them.
        fn: the statistic; takes the resampled tensors as positional arguments and returns a
            number. ``None`` means the mean of a single tensor (computed vectorised).
        seed: seeds the resampling, so equal inputs give equal intervals.
        n_resamples: bootstrap resamples.
        confidence: two-sided level.
        paired: ``True`` resamples all tensors with the same row indices (they must have equal
            length: paired samples such as reference and erased images on the same seeds);
            ``False`` resamples each tensor independently (two unrelated sets).

    Returns ``(low, high)``; ``(nan, nan)`` for empty input.
    """
    tensors = _as_tuple(values)
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples} must be at least 1")
    lengths = [t.shape[0] for t in tensors]
    if min(lengths) == 0:
        return math.nan, math.nan
    if paired and len(set(lengths)) != 1:
        raise ValueError(f"paired bootstrap needs equal lengths, got {lengths}")
    _z(confidence)  # validates
    gen = torch.Generator().manual_seed(int(seed))
    if fn is None:
        if len(tensors) != 1:
            raise ValueError("fn=None (the mean) takes exactly one tensor")
        x = tensors[0].double().reshape(lengths[0], -1).mean(dim=1)
        idx = torch.randint(0, lengths[0], (n_resamples, lengths[0]), generator=gen)
        stats = x[idx].mean(dim=1)
    else:
        out = []
        for _ in range(n_resamples):
            if paired:
                idx = torch.randint(0, lengths[0], (lengths[0],), generator=gen)
                resampled = [t[idx] for t in tensors]
            else:
                resampled = [t[torch.randint(0, len(t), (len(t),), generator=gen)] for t in tensors]
            out.append(float(fn(*resampled)))
        stats = torch.tensor(out, dtype=torch.float64)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]`` (float64)."""
    x = features.double().reshape(features.shape[0], -1)
    mu = x.mean(dim=0)
    xc = x - mu
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    return mu, cov


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the trace of the matrix square root
    taken as the sum of square roots of the eigenvalues of ``S_a S_b`` (the formula torchmetrics'
    ``FrechetInceptionDistance`` uses, so the two agree). Each set needs at least two rows.
    Tiny negative results from round-off are returned as 0.
    """
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("each feature set needs at least two samples for a covariance")
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(features_a.shape)} vs {tuple(features_b.shape)}")
    mu_a, cov_a = gaussian_stats(features_a)
    mu_b, cov_b = gaussian_stats(features_b)
    mean_term = (mu_a - mu_b).square().sum()
    sqrt_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    value = float(mean_term + cov_a.trace() + cov_b.trace() - 2.0 * sqrt_trace)
    return max(value, 0.0)


def pixel_difference(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample ``[N]`` of paired images ``[N, C, H, W]`` (same value range)."""
    if images_a.shape != images_b.shape:
        raise ValueError(f"image shapes differ: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    return (images_a.float() - images_b.float()).abs().flatten(1).mean(dim=1)


def ssim_per_sample(images_a: torch.Tensor, images_b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per sample ``[N]`` of paired images ``[N, C, H, W]`` (torchmetrics, Gaussian 11x11 window).

    Windows larger than the image are shrunk to the largest odd size that fits.
    """
    from torchmetrics.functional import structural_similarity_index_measure

    if images_a.shape != images_b.shape:
        raise ValueError(f"image shapes differ: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    side = min(images_a.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    sigma = 1.5 * kernel / 11.0
    out = structural_similarity_index_measure(
        images_a.float(), images_b.float(), data_range=data_range, reduction="none",
        kernel_size=kernel, sigma=sigma,
    )
    return out.reshape(-1)


# ----------------------------------------------------------------------------- JSON-ready summaries
def rate_summary(flags: torch.Tensor, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """``{"k", "n", "rate", "ci": [low, high]}`` of a boolean tensor ``[N]`` (Wilson interval)."""
    flags = torch.as_tensor(flags).bool().reshape(-1)
    k, n = int(flags.sum()), int(flags.numel())
    lo, hi = wilson_interval(k, n, confidence)
    return {"k": k, "n": n, "rate": (k / n) if n else None, "ci": [lo, hi]}


def mean_summary(values: torch.Tensor, seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES,
                 confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """``{"mean", "n", "ci": [low, high]}`` of values ``[N]`` (seeded percentile bootstrap)."""
    values = torch.as_tensor(values).double().reshape(-1)
    n = int(values.numel())
    if n == 0:
        return {"mean": None, "n": 0, "ci": [None, None]}
    lo, hi = bootstrap_ci(values, None, seed=seed, n_resamples=n_resamples, confidence=confidence)
    return {"mean": float(values.mean()), "n": n, "ci": [lo, hi]}


def paired_rate_drop(reference: torch.Tensor, erased: torch.Tensor, seed: int = 0,
                     n_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Drop in rate from reference to erased on paired samples (same seeds), with a paired bootstrap CI."""
    ref = torch.as_tensor(reference).double().reshape(-1)
    era = torch.as_tensor(erased).double().reshape(-1)
    if ref.numel() == 0:
        return {"drop": None, "n": 0, "ci": [None, None]}
    lo, hi = bootstrap_ci((ref - era,), None, seed=seed, n_resamples=n_resamples, confidence=confidence)
    return {"drop": float(ref.mean() - era.mean()), "n": int(ref.numel()), "ci": [lo, hi]}
