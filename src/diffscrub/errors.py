"""Errors that the command line turns into a one-line message and exit code 2.

Every error a user can cause (a bad folder, a bad config value, an unknown family)
raises a subclass of :class:`DiffscrubError`, whose message names the offending file
or value and says how to fix it. Anything else is a bug and keeps its traceback.
"""


class DiffscrubError(Exception):
    """Base class of user-facing errors. ``str(err)`` is a single line: what, where, fix."""

    exit_code = 2


class InputError(DiffscrubError):
    """A file, folder or model the user pointed at cannot be used."""


class ConfigError(DiffscrubError):
    """A configuration key or value is invalid."""


class UnknownFamilyError(DiffscrubError):
    """No adapter knows the pipeline's denoiser family."""


class TrainingError(DiffscrubError):
    """Training could not go on (for example a non-finite loss)."""


class Interrupted(DiffscrubError):
    """The run was stopped by a signal after saving a checkpoint."""

    exit_code = 130


def print_error(message: str) -> None:
    """Write one ``diffscrub: ...`` line to stderr in a single write.

    ``print`` writes the text and the newline separately; with several processes on one stderr
    (``torchrun``) their lines could then run together. One write of a short line is atomic.
    """
    import sys

    sys.stderr.write(f"diffscrub: {message}\n")
    sys.stderr.flush()
