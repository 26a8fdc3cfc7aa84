"""Erasure methods, one package each, registered by name."""

from .base import INPUTS, METHODS, Method, list_methods
from .tss import TSSConfig, TeacherStudentScrubber

__all__ = ["INPUTS", "METHODS", "Method", "TSSConfig", "TeacherStudentScrubber", "list_methods"]
