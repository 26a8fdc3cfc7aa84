"""Contrastive fingerprint: keep the prototypes that fire on the forget images, not on the rest.

K-means over every location of cluttered forget images also finds backgrounds and other
objects (a photo of a cat shows a sofa too); a mask built from those prototypes would
erase them as well. A prototype is kept when the share of forget locations it detects
(cosine similarity above ``tau``) is at least ``ratio`` times the share of retain
locations it detects. Retain features come from a retain folder, or from images the
model generates itself under the null prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrototypeSelection:
    keep: torch.Tensor  # [K] bool
    forget_rate: torch.Tensor  # [K] share of forget locations detected by each prototype
    retain_rate: torch.Tensor  # [K] share of retain locations detected

    def as_dict(self) -> dict:
        return {"kept": self.keep.tolist(), "forget_rate": [round(float(x), 4) for x in self.forget_rate],
                "retain_rate": [round(float(x), 4) for x in self.retain_rate]}


def detection_rates(prototypes: torch.Tensor, vectors: torch.Tensor, tau: float, chunk: int = 65536) -> torch.Tensor:
    """Share of ``vectors [N, D]`` whose cosine similarity to each prototype ``[K, D]`` exceeds ``tau``: ``[K]``."""
    hits = torch.zeros(prototypes.shape[0])
    protos = F.normalize(prototypes.float(), dim=-1)
    for start in range(0, vectors.shape[0], chunk):
        v = F.normalize(vectors[start:start + chunk].float(), dim=-1)
        hits += (v @ protos.T > tau).float().sum(0)
    return hits / max(1, vectors.shape[0])


def select_prototypes(prototypes: torch.Tensor, forget_vectors: torch.Tensor, retain_vectors: torch.Tensor,
                      tau: float, ratio: float) -> PrototypeSelection:
    """Keep prototypes with ``forget_rate >= ratio * retain_rate`` (and a non-zero forget rate).

    If none passes, the single most forget-specific prototype is kept, so the detector never
    goes blind; the rates in the result show how weak that choice is.
    """
    f = detection_rates(prototypes, forget_vectors, tau)
    r = detection_rates(prototypes, retain_vectors, tau)
    keep = (f >= ratio * r) & (f > 0)
    if not keep.any():
        keep[torch.argmax(f / (r + 1e-3))] = True
    return PrototypeSelection(keep, f, r)
