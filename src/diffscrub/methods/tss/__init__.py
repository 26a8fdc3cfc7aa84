"""The Teacher–Student Scrubber (seed 000): prototype detection, z0-blinding, masked distillation."""

from .config import TSSConfig
from .method import TeacherStudentScrubber

__all__ = ["TSSConfig", "TeacherStudentScrubber"]
