"""Phase 1: the concept's fingerprint, K prototype directions in the teacher's feature space.

Clustering runs on L2-normalised vectors (spherical k-means), because the detector compares
directions by cosine similarity: raw-feature k-means would let the vectors' norms, which the
detector ignores, decide the clusters.

Two back ends give the same clustering (both seeded k-means++ then Lloyd iterations):
scikit-learn's MiniBatchKMeans for small sets, and a torch implementation that runs on the
feature vectors' device (a GPU for full-size models) for large ones, where moving millions of
vectors to NumPy would dominate Phase 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

#: above this many vectors, ``backend="auto"`` clusters with torch.
TORCH_THRESHOLD = 200_000


def subsample(vectors: torch.Tensor, max_per_image: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``max_per_image`` vectors of each image: ``[B, L, D]`` -> ``[B * min(L, max), D]``."""
    b, l, d = vectors.shape
    if l <= max_per_image:
        return vectors.reshape(b * l, d)
    idx = torch.stack([torch.randperm(l, generator=generator)[:max_per_image] for _ in range(b)])  # [B, m]
    return torch.gather(vectors, 1, idx.to(vectors.device)[..., None].expand(-1, -1, d)).reshape(-1, d)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors ``x [N, D]``: ``[K, D]``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    dist = (1 - x @ centres[0]).clamp_min(0)  # cosine distance to the nearest centre, [N]
    for _ in range(1, k):
        weight = dist.pow(2)  # D^2 weighting, as k-means++ prescribes
        probs = weight / weight.sum() if weight.sum() > 0 else torch.full_like(dist, 1.0 / n)
        nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        centres.append(x[nxt])
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp_min(0))
    return torch.stack(centres)


def torch_kmeans(vectors: torch.Tensor, k: int, seed: int = 0, iters: int = 100, tol: float = 1e-6,
                 n_init: int = 3, chunk: int = 262_144) -> torch.Tensor:
    """Spherical k-means on ``vectors [N, D]`` where they live; returns unit centres ``[K, D]``.

    ``n_init`` seeded restarts; the one with the highest total cosine similarity of vectors to
    their centres wins (the spherical k-means objective).
    """
    x = F.normalize(vectors.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    best, best_score = None, -float("inf")
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, gen)
        for _ in range(iters):
            sums = torch.zeros_like(centres)
            counts = torch.zeros(k, device=x.device)
            score = 0.0
            for start in range(0, x.shape[0], chunk):
                part = x[start:start + chunk]
                sim, assign = (part @ centres.T).max(dim=1)  # [n]
                score += float(sim.sum())
                sums.index_add_(0, assign, part)
                counts += torch.bincount(assign, minlength=k).float()
            # An emptied cluster keeps its centre rather than collapsing to zero.
            new = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centres)
            shift = float((1 - (new * centres).sum(-1)).max())
            centres = new
            if shift < tol:
                break
        if score > best_score:
            best, best_score = centres, score
    return best


def fit_prototypes(vectors: torch.Tensor, k: int, seed: int = 0, backend: str = "auto") -> torch.Tensor:
    """K unit-norm prototypes ``[K, D]`` from feature vectors ``[N, D]``.

    Args:
        backend: ``sklearn`` (MiniBatchKMeans), ``torch`` (on the vectors' device), or ``auto``
            (torch above :data:`TORCH_THRESHOLD` vectors).
    """
    n = vectors.shape[0]
    if n < k:
        raise ConfigError(
            f"num_prototypes={k} is more than the {n} feature vectors extracted: lower --num-prototypes "
            "or give more forget images"
        )
    if backend == "auto":
        backend = "torch" if n > TORCH_THRESHOLD else "sklearn"
    if backend == "torch":
        return torch_kmeans(vectors, k, seed).cpu()
    if backend != "sklearn":
        raise ConfigError(f"k-means backend {backend!r} is not valid: choose auto, sklearn or torch")
    from sklearn.cluster import MiniBatchKMeans

    data = F.normalize(vectors.float(), dim=-1).cpu().numpy().astype(np.float64)
    km = MiniBatchKMeans(n_clusters=k, batch_size=min(8192, max(256, n)), random_state=seed, n_init=3)
    km.fit(data)
    return F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)
