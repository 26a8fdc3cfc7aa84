"""Writing outputs so that a crash never leaves a half-written folder where the user looks.

Everything is written into a temporary sibling of the destination and renamed into place
only when complete. An existing destination is replaced only with ``overwrite``, and only
after the new one is complete; on any failure the old folder is left as it was.

A run that records its own paths (the demo's and the bench's erase and eval records, the demo's
report) records them while they are still inside the temporary folder; those records are
rewritten to the destination's paths before the rename, so that every saved config can be
re-run as it stands.
"""

from __future__ import annotations

import contextlib
import errno
import html
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
        _relocate_records(tmp, out)
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


#: files whose text may name the temporary folder (run records, metrics, reports); weights and images are skipped
_RECORD_SUFFIXES = (".json", ".html")


def _relocate_records(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Rewrite every mention of ``tmp`` in the records under it to ``out``, the folder they are renamed to.

    The temporary folder is a sibling of ``out`` with a name no user picks (``.NAME.tmp-PID``), so a plain
    substring replacement is exact; both the path as given and its resolved form are replaced, as a
    record may hold either.
    """
    # the longer form first, so that a relative path inside the resolved one is not replaced half-way
    pairs = dict(sorted({str(tmp): str(out), str(tmp.resolve()): str(out.parent.resolve() / out.name)}.items(),
                        key=lambda kv: -len(kv[0])))
    for path in tmp.rglob("*"):
        if path.suffix not in _RECORD_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if path.suffix == ".json":
            # compare and replace the decoded strings: json escapes some characters a path may hold
            if not any(old in text or json.dumps(old)[1:-1] in text for old in pairs):
                continue
            try:
                data = json.loads(text)
            except ValueError:
                continue  # not ours to fix
            write_json(path, _replace_strings(data, pairs))
        else:
            new = text
            for old, dest in pairs.items():
                new = new.replace(html.escape(old, quote=True), html.escape(dest, quote=True))
            if new != text:
                path.write_text(new, encoding="utf-8", errors="surrogateescape")


def _replace_strings(value, pairs: dict[str, str]):
    if isinstance(value, str):
        for old, dest in pairs.items():
            value = value.replace(old, dest)
        return value
    if isinstance(value, dict):
        return {_replace_strings(k, pairs): _replace_strings(v, pairs) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, pairs) for v in value]
    return value


def write_json(path: str | pathlib.Path, data) -> None:
    """Sorted, indented JSON, written atomically (temp file + rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
