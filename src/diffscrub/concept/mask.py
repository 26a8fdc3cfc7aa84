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


def surround_fill(z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel mean of the latent outside the mask, broadcast to ``z0``'s shape.

    ``z0 [B, C, H, W]``, ``mask [B, 1, H, W]``. A flat patch of the surrounding colour is what a
    region looks like with its object taken out, before the teacher adds texture: the teacher
    inpaints from it at every noise level, where a noise fill reads as content at small t.
    """
    keep = (1.0 - mask).clamp_min(0)
    weight = keep.sum(dim=(2, 3), keepdim=True)
    mean = (z0 * keep).sum(dim=(2, 3), keepdim=True) / weight.clamp_min(1e-6)
    # an image the mask covers entirely has no surround: fall back to its own mean
    mean = torch.where(weight > 1e-3, mean, z0.mean(dim=(2, 3), keepdim=True))
    return mean.expand_as(z0)
