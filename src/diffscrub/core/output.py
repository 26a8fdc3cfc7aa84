"""Writing outputs so that a crash never leaves a half-written folder where the user looks.

Everything is written into a temporary sibling of the destination and renamed into place
only when complete. An existing destination is replaced only with ``overwrite``, and only
after the new one is complete; on any failure the old folder is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil

from ..errors import InputError


def check_output_dir(out: str | pathlib.Path, *, overwrite: bool, flag: str = "--out") -> pathlib.Path:
    """Refuse a non-empty destination unless ``overwrite``; check the parent is writable. Runs before loading."""
    out = pathlib.Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output '{out}' exists and is a file: pass {flag} with a folder path")
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"output folder '{out}' exists and is not empty: pass --overwrite or choose another {flag}")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise InputError(f"cannot write to '{probe}' for output '{out}': choose a writable {flag}")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | pathlib.Path, *, overwrite: bool):
    """Yield a temporary folder; on success it replaces ``out``, on failure it is removed.

    Out-of-disk errors are reported as one line saying the previous output is intact.
    """
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise InputError(
                f"ran out of disk space while writing '{out}': the previous contents of '{out}' are intact; "
                "free space or choose another --out"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"output folder '{out}' appeared while running: pass --overwrite or choose another --out")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | pathlib.Path, data) -> None:
    """Sorted, indented JSON, written atomically (temp file + rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
