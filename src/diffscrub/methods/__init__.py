"""Erasure methods, one package each, registered by name."""

from .base import INPUTS, METHODS, Method, list_methods
from .tss import TSSConfig, TeacherStudentScrubber
from . import esd  # noqa: F401  (registers --method esd)
from . import attention  # noqa: F401  (registers --method attention)
from . import vdu  # noqa: F401  (registers --method vdu)
from . import sfd  # noqa: F401  (registers --method sfd)

__all__ = ["INPUTS", "METHODS", "Method", "TSSConfig", "TeacherStudentScrubber", "list_methods"]
