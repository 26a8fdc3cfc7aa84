"""Erased Stable Diffusion (Gandikota et al., 2023): negative-guidance fine-tuning, the usual baseline."""

from .config import ESDConfig
from .method import ESD

__all__ = ["ESD", "ESDConfig"]
