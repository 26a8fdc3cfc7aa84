"""Variational Diffusion Unlearning (seed 002): bounded plasticity inducer plus a precision-weighted
stability regulariser in parameter space."""

from .config import VDUConfig
from .method import VDU

__all__ = ["VDU", "VDUConfig"]
