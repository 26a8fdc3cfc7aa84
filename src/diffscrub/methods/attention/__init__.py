"""Cross-attention steering away from the concept's tokens (seed 001, "AIzheimer")."""

from .config import AttentionConfig
from .method import AttentionSteering

__all__ = ["AttentionConfig", "AttentionSteering"]
