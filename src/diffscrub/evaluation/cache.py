"""Samples kept by what drew them, so a model sampled again on the same prompts and seeds is read back.

``diffscrub bench`` evaluates every erased model against the original, and reads the retrained
model the same way: before this cache the original was sampled once per method and once more for
the retrained row, and a sweep over erase seeds sampled the same two unchanged models in every run.
A sample depends only on the model's files, its prompt, its seed and the sampler's settings
(``sample_images`` gives every sample its own generator), so those are the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import torch

from ..errors import InputError


def folder_identity(path: str | os.PathLike) -> str:
    """sha256 over a model folder's files (relative path and contents), or over one file.

    Contents, not names or times: an erase run written again into the same folder is another model."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def sample_key(model_identity: str, prompts: list[str], seeds: list[int], **settings) -> str:
    """The cache key of one sampling call: the model, every (prompt, seed) pair in order, and the
    settings that change an image (steps, guidance, size, one-step timestep), with the library versions
    whose numerics they go through."""
    import diffusers

    payload = {"model": model_identity, "prompts": list(prompts), "seeds": [int(s) for s in seeds],
               "settings": settings, "torch": torch.__version__, "diffusers": diffusers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class SampleCache:
    """Images ``[N, 3, H, W]`` in [0, 1] by :func:`sample_key`: under ``root`` when given, else in memory.

    With a folder nothing is held in memory: a run's samples of full-size images would otherwise stay
    resident until it ends (1,000 samples at 1024 px are 12 GB in float32). Files are written to a
    temporary name and renamed, so a run killed while writing leaves no half file for the next one to read."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = pathlib.Path(root) if root is not None else None
        if self.root is not None:
            if self.root.exists() and not self.root.is_dir():
                raise InputError(f"sample cache '{self.root}' is a file: pass a folder")
            self.root.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _file(self, key: str) -> pathlib.Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """A copy of the images kept under ``key`` (the caller may change it), or None."""
        images = None
        if self.root is None:
            images = self._memory.get(key)
            images = None if images is None else images.clone()
        elif self._file(key).is_file():
            from safetensors.torch import load_file

            try:
                images = load_file(str(self._file(key)))["images"]
            except Exception:  # an unreadable entry is a miss: it is drawn again and rewritten
                images = None
        if images is None:
            self.misses += 1
            return None
        self.hits += 1
        return images

    def put(self, key: str, images: torch.Tensor) -> None:
        images = images.detach().cpu().contiguous()
        if self.root is None:
            self._memory[key] = images.clone()
        else:
            from safetensors.torch import save_file

            tmp = self._file(key).with_suffix(f".tmp{os.getpid()}")
            save_file({"images": images}, str(tmp))
            os.replace(tmp, self._file(key))
