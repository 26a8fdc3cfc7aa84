"""Unsupervised concept detection: prototypes from teacher features, masks by cosine similarity."""

from .contrast import PrototypeSelection, select_prototypes
from .mask import blind, concept_mask, similarity, soft_mask, surround_fill, to_latent
from .prototypes import fit_prototypes, subsample

__all__ = [
    "PrototypeSelection", "blind", "concept_mask", "fit_prototypes", "select_prototypes", "similarity", "soft_mask",
    "subsample", "surround_fill", "to_latent",
]
