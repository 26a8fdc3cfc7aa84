"""Phase 1: the concept's fingerprint, K prototype directions in the teacher's feature space.

Clustering runs on L2-normalised vectors (spherical k-means), because the detector compares
directions by cosine similarity: raw-feature k-means would let the vectors' norms, which the
detector ignores, decide the clusters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError


def subsample(vectors: torch.Tensor, max_per_image: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``max_per_image`` vectors of each image: ``[B, L, D]`` -> ``[B * min(L, max), D]``."""
    b, l, d = vectors.shape
    if l <= max_per_image:
        return vectors.reshape(b * l, d)
    idx = torch.stack([torch.randperm(l, generator=generator)[:max_per_image] for _ in range(b)])  # [B, m]
    return torch.gather(vectors, 1, idx.to(vectors.device)[..., None].expand(-1, -1, d)).reshape(-1, d)


def fit_prototypes(vectors: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """K unit-norm prototypes ``[K, D]`` from feature vectors ``[N, D]`` (scikit-learn MiniBatchKMeans)."""
    from sklearn.cluster import MiniBatchKMeans

    n = vectors.shape[0]
    if n < k:
        raise ConfigError(
            f"num_prototypes={k} is more than the {n} feature vectors extracted: lower --num-prototypes "
            "or give more forget images"
        )
    data = F.normalize(vectors.float(), dim=-1).cpu().numpy().astype(np.float64)
    km = MiniBatchKMeans(n_clusters=k, batch_size=min(8192, max(256, n)), random_state=seed, n_init=3)
    km.fit(data)
    return F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)
