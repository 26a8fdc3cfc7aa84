"""Score Forgetting Distillation (seed 003), score-level and data-free."""

from .config import SFDConfig
from .method import ScoreForgettingDistillation

__all__ = ["SFDConfig", "ScoreForgettingDistillation"]
