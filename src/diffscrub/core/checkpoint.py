"""Checkpoints that a crash cannot corrupt, and resuming to the same result as an uninterrupted run.

A checkpoint is a folder ``step-NNNNNNN`` under ``.{out}.checkpoints/`` beside the output:

* ``state.safetensors``: the student's trainable tensors, the method's state (prototypes,
  masks) and the conditioning pool's tensors (textual inversion is random: resuming reuses it);
* ``optimizer.pt``: the optimizer state (tensors and numbers only, loaded with ``weights_only``);
* ``meta.json``: step, RNG states, batch-sampler orders, loss history, the run's identity, and
  ``complete: true`` written last.

It is written as ``step-NNNNNNN.tmp-PID`` and renamed when complete, so a kill in the middle of
a save leaves only a ``.tmp-`` folder, which is never loaded and is cleaned up later.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import torch

from ..errors import InputError

PREFIX = "step-"
FORGET_EXTRA = "forget_extra"  # state.safetensors keys of the images added to the forget set in phase 1


def checkpoint_root(out: str | pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(out)
    return out.parent / f".{out.name}.checkpoints"


def checkpoint_path(root: pathlib.Path, step: int) -> pathlib.Path:
    """Where the complete checkpoint of ``step`` lives."""
    return root / f"{PREFIX}{step:07d}"


def run_identity(config, method_config, forget_paths, retain_paths) -> str:
    """Hash of what determines the run: the config (except bookkeeping keys) and the input files.

    A checkpoint of a different run (other images, other options) is refused on ``--resume``.
    """
    from ..config import to_dict

    cfg = {k: v for k, v in to_dict(config).items()
           if k not in ("steps", "out", "overwrite", "quiet", "resume", "checkpoint_every", "log_every")}
    files = []
    for p in list(forget_paths) + list(retain_paths or []):
        st = os.stat(p)
        files.append([str(p), st.st_size, int(st.st_mtime)])
    blob = json.dumps({"config": cfg, "method": to_dict(method_config), "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten_cond(kwargs: dict, prefix: str = "cond.") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, dict):
            out.update(_flatten_cond(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def _restore_cond(template: dict, tensors: dict[str, torch.Tensor], prefix: str = "cond.") -> dict:
    out = {}
    for key, value in template.items():
        if isinstance(value, dict):
            out[key] = _restore_cond(value, tensors, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            out[key] = tensors[f"{prefix}{key}"].to(value.device, value.dtype)
        else:
            out[key] = value
    return out


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage.

    safetensors refuses two entries that share memory (for example the kept prototypes when every
    prototype is kept); only those are copied, so large weights are not duplicated.
    """
    seen, out = set(), {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
            ptr = value.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = value
    return out


def save_checkpoint(root: pathlib.Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer_state: dict, ctx,
                    method, history, identity: str, extra: dict | None = None, keep: int = 2) -> pathlib.Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` complete ones.

    ``trainable``: the student's trainable tensors by name and ``optimizer_state``: the optimizer's state dict,
    both whole (:meth:`Distributed.trainable_tensors` and :meth:`Distributed.optimizer_state` gather them
    when the student is sharded).

    A full disk gives a one-line error naming the checkpoint that is still intact.
    """
    final = checkpoint_path(root, step)
    tmp = root / f"{PREFIX}{step:07d}.tmp-{os.getpid()}"
    try:
        _write(root, tmp, step, trainable=trainable, optimizer_state=optimizer_state, ctx=ctx, method=method,
               history=history, identity=identity, extra=extra)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            kept = complete_checkpoints(root)
            raise InputError(
                f"ran out of disk space while saving checkpoint {step} in '{root}': "
                + (f"the previous checkpoint '{kept[-1].name}' is intact; " if kept else "")
                + "free space, then rerun with --resume"
            ) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(root: pathlib.Path, tmp: pathlib.Path, step: int, *, trainable, optimizer_state, ctx, method, history,
           identity: str, extra: dict | None) -> None:
    """Everything of one checkpoint into ``tmp`` (renamed into place by the caller)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in trainable.items()}
    tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in method.state_dict().items()})
    tensors.update({k: v.detach().cpu().contiguous() for k, v in _flatten_cond(ctx.cond.kwargs).items()})
    if ctx.forget_extra is not None:  # images drawn in phase 1 (--name-samples): random, so kept, not redrawn
        tensors.update({f"{FORGET_EXTRA}.mean": ctx.forget_extra.mean.contiguous(),
                        f"{FORGET_EXTRA}.std": ctx.forget_extra.std.contiguous()})
    save_file(unshared(tensors), str(tmp / "state.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    meta = {
        "step": step, "identity": identity, "prompts": ctx.cond.prompts, "neutral": ctx.cond.neutral,
        "pool_size": ctx.cond.pool_size, "history": history,
        "generator": ctx.generator.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
        "forget_sampler": ctx.forget_sampler.state_dict(),
        "retain_sampler": ctx.retain_sampler.state_dict() if ctx.retain_sampler else None,
        "extra": extra or {}, "complete": True,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    with open(tmp / "meta.json", "rb") as fh:  # the rename must not overtake the data on disk
        os.fsync(fh.fileno())


def complete_checkpoints(root: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints, oldest first (a ``.tmp-`` folder or one without ``complete`` is skipped)."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith(PREFIX) or ".tmp-" in d.name:
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("complete") and (d / "state.safetensors").is_file() and (d / "optimizer.pt").is_file():
            out.append(d)
    return sorted(out, key=lambda d: d.name)


def restore_forget_extra(folder: pathlib.Path, ctx) -> None:
    """Add the forget images a run drew in phase 1 back to ``ctx`` (before the method prepares over them)."""
    from safetensors import safe_open

    from .context import LatentCache

    with safe_open(str(folder / "state.safetensors"), framework="pt") as fh:
        if f"{FORGET_EXTRA}.mean" in fh.keys():
            ctx.add_forget(LatentCache(fh.get_tensor(f"{FORGET_EXTRA}.mean"), fh.get_tensor(f"{FORGET_EXTRA}.std")))


def load_checkpoint(folder: pathlib.Path, *, student, optimizer, ctx, method, identity: str) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the meta dict (step, history, extra).

    ``student`` must still be whole (not yet sharded). ``optimizer=None`` leaves the optimizer state for the
    caller (:func:`read_optimizer_state`): a sharded student's optimizer only exists after sharding.
    """
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    if meta["identity"] != identity:
        raise InputError(
            f"checkpoint '{folder}' belongs to a run with other inputs or options: rerun with the same flags, "
            "or drop --resume (and delete that folder) to start afresh"
        )
    tensors = load_file(str(folder / "state.safetensors"))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                params[key[len("param."):]].copy_(value)
    method.load_state_dict({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})
    from ..adapters.base import Conditioning

    ctx.cond = Conditioning(meta["prompts"], _restore_cond(ctx.cond.kwargs, tensors), meta.get("neutral"),
                            meta.get("pool_size"))
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(folder))
    ctx.generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    ctx.forget_sampler.load_state_dict(meta["forget_sampler"])
    if ctx.retain_sampler and meta["retain_sampler"]:
        ctx.retain_sampler.load_state_dict(meta["retain_sampler"])
    return meta


def read_optimizer_state(folder: pathlib.Path) -> dict:
    return torch.load(folder / "optimizer.pt", weights_only=True)


def clean_partial(root: pathlib.Path) -> None:
    """Remove ``.tmp-`` folders that a killed save left behind."""
    if root.is_dir():
        for d in root.iterdir():
            if ".tmp-" in d.name:
                shutil.rmtree(d, ignore_errors=True)
