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


def out_of_memory_line(exc: BaseException) -> str | None:
    """The one-line message for running out of GPU or CPU memory, or ``None`` for any other error.

    Running out of memory is not a bug of the user's input but a size the machine cannot hold:
    the user gets the options that shrink the step, not a traceback. (``torch.OutOfMemoryError``
    is a ``RuntimeError``; the CPU allocator raises a plain ``RuntimeError`` with its own text.)
    """
    text = str(exc).strip()
    gpu = type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text
    cpu = isinstance(exc, MemoryError) or "DefaultCPUAllocator" in text or "not enough memory" in text
    if not (gpu or cpu):
        return None
    first = text.splitlines()[0][:160] if text else type(exc).__name__
    return (f"error: out of {'GPU' if gpu else 'CPU'} memory ({first}): lower --batch-size, or use "
            f"--mixed-precision bf16, --gradient-checkpointing or --trainable lora; the output folder is as it was")


def run_command(command, *args) -> int:
    """Run a CLI command; user errors, Ctrl-C and running out of memory become one stderr line and
    an exit code (both entry points, so their messages cannot drift apart). Bugs keep their traceback."""
    try:
        return int(command(*args) or 0)
    except DiffscrubError as exc:
        print_error(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        print_error("interrupted; nothing was written to the output folder")
        return 130
    except (MemoryError, RuntimeError) as exc:
        line = out_of_memory_line(exc)
        if line is None:
            raise
        print_error(line)
        return 1
