"""Unsupervised concept detection: prototypes from teacher features, masks by cosine similarity."""

from .mask import blind, concept_mask, similarity, soft_mask, to_latent
from .prototypes import fit_prototypes, subsample

__all__ = ["blind", "concept_mask", "fit_prototypes", "similarity", "soft_mask", "subsample", "to_latent"]
