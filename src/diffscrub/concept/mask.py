"""Phase 2 detection: where the concept is, as a soft mask at latent resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters.base import Features


def similarity(features: Features, prototypes: torch.Tensor) -> torch.Tensor:
    """Max cosine similarity of each location to any prototype: ``[B, L, D]`` x ``[K, D]`` -> ``[B, L]``."""
    feats = F.normalize(features.vectors.float(), dim=-1)
    return (feats @ prototypes.to(feats.device, feats.dtype).T).amax(dim=-1)


def soft_mask(sim: torch.Tensor, tau: float, alpha: float) -> torch.Tensor:
    """``sigmoid(alpha * (sim - tau))``, values in [0, 1]."""
    return torch.sigmoid(alpha * (sim - tau))


def to_latent(mask: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per-location mask ``[B, L]`` on ``grid`` to ``[B, 1, H, W]`` at latent resolution.

    Bilinear upsampling keeps the mask soft at region borders (nearest would make 2x2 or
    larger blocks with hard seams); values stay in [0, 1] because it is a convex combination.
    """
    b = mask.shape[0]
    m = mask.reshape(b, 1, *grid)
    if tuple(grid) == tuple(latent_hw):
        return m
    return F.interpolate(m, size=latent_hw, mode="bilinear", align_corners=False).clamp(0, 1)


def concept_mask(features: Features, prototypes: torch.Tensor, tau: float, alpha: float, latent_hw) -> torch.Tensor:
    """Features to a latent-resolution soft mask ``[B, 1, H, W]``."""
    return to_latent(soft_mask(similarity(features, prototypes), tau, alpha), features.grid, latent_hw)


def blind(z0: torch.Tensor, mask: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Replace the masked part of the clean latent by ``eta``: ``(1 - M) * z0 + M * eta``.

    ``eta`` is noise (the seed's choice) or :func:`surround_fill`. The result is re-noised by the
    caller with the *same* t and eps as ``z_t``, so outside the mask the blinded and original
    noisy latents agree exactly.
    """
    return (1.0 - mask) * z0 + mask * eta


def surround_fill(z0: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor | None = None,
                  prior_weight: float = 0.0) -> torch.Tensor:
    """Per-image, per-channel mean of the latent outside the mask, broadcast to ``z0``'s shape.

    ``z0 [B, C, H, W]``, ``mask [B, 1, H, W]``. A flat patch of the surrounding colour is what a
    region looks like with its object taken out, before the teacher adds texture: the teacher
    inpaints from it at every noise level, where a noise fill reads as content at small t.

    ``prior [C]`` or ``[B, C]`` (the mean colour of an image without the concept) enters as
    ``prior_weight`` of an image's area worth of extra surround:
    ``(sum(keep * z0) + w * H * W * prior) / (sum(keep) + w * H * W)``. Where the concept is the
    background (brick, a style), the mask covers most of the image and its surround is the concept's
    own colour, which the teacher refills with the concept; the prior pulls the fill toward an image
    without it, and the less surround there is, the more.
    """
    keep = (1.0 - mask).clamp_min(0)
    weight = keep.sum(dim=(2, 3), keepdim=True)  # [B, 1, 1, 1]
    total = (z0 * keep).sum(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
    if prior is not None and prior_weight > 0:
        pseudo = prior_weight * z0.shape[-2] * z0.shape[-1]
        prior = prior.to(z0).reshape(-1, z0.shape[1], 1, 1)  # [1 or B, C, 1, 1]
        mean = (total + pseudo * prior) / (weight + pseudo)
        return mean.expand_as(z0)
    mean = total / weight.clamp_min(1e-6)
    # an image the mask covers entirely has no surround: fall back to its own mean
    mean = torch.where(weight > 1e-3, mean, z0.mean(dim=(2, 3), keepdim=True))
    return mean.expand_as(z0)
