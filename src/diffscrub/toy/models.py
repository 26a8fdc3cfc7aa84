"""Finding and loading the shipped toy models by name."""

from __future__ import annotations

from pathlib import Path

import torch

from diffscrub.errors import InputError
from diffscrub.toy.recipes import MODEL_NAMES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def resolve_toy_model(name: str | Path) -> Path | None:
    """Shipped folder of a toy model name (``"toy-unet"``, ``"toy-mmdit"``), else ``None``.

    Returns ``None`` for any other name or path, so callers can write
    ``resolve_toy_model(name) or name``. Raises :class:`InputError` when the name is a toy
    model whose weights are missing from this installation.
    """
    key = str(name).strip().lower()
    if key not in MODEL_NAMES:
        return None
    folder = WEIGHTS_DIR / key
    if not (folder / "model_index.json").is_file():
        raise InputError(
            f"toy model {key!r} has no weights at {folder}: reinstall diffscrub or run "
            f"`diffscrub toy train --model {key} --out DIR` and pass DIR/{key}"
        )
    return folder


def model_folder(name_or_path: str | Path) -> Path:
    """A toy name or a pipeline folder -> the folder (InputError if it is neither)."""
    folder = resolve_toy_model(name_or_path)
    if folder is not None:
        return folder
    p = Path(name_or_path)
    if not (p / "model_index.json").is_file():
        raise InputError(
            f"model {str(name_or_path)!r} is neither a toy model name ({', '.join(MODEL_NAMES)}) "
            "nor a diffusers pipeline folder with model_index.json: pass one of those"
        )
    return p


def load_toy_pipeline(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a toy model (by name or folder) as a diffusers pipeline in ``dtype`` on ``device``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_folder(name_or_path)))
    if any(getattr(m, "dtype", dtype) != dtype for m in pipe.components.values()):
        pipe = pipe.to(dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
