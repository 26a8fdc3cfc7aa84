"""Loading a user's pipeline the ordinary diffusers way, with safe defaults.

Accepted: a diffusers pipeline folder, a hub id available locally (or online where the machine
has a network), a single ``.safetensors`` checkpoint, or a toy model name (``toy-unet``).
Pickle files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded and are refused
unless the user passes ``--allow-pickle``; hub pipelines that need custom code are refused
unless ``--trust-remote-code``.
"""

from __future__ import annotations

import json
import pathlib

from .errors import InputError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
#: single-file loaders by family (class names in diffusers).
SINGLE_FILE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def resolve_model(model: str) -> str:
    """Map a toy model name to its shipped folder; other strings pass through unchanged."""
    try:
        from .toy import resolve_toy_model
    except ImportError:  # the toy package is optional at import time
        return model
    path = resolve_toy_model(model)
    return str(path) if path is not None else model


def check_model_arg(model: str, *, allow_pickle: bool = False) -> None:
    """Cheap checks on ``--model`` that run before anything heavy loads."""
    path = pathlib.Path(resolve_model(model))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not path.exists():
            raise InputError(f"model file '{path}' does not exist: check --model")
        if not allow_pickle:
            raise InputError(
                f"model file '{path}' is a pickle checkpoint, which can run arbitrary code when loaded: "
                "convert it to .safetensors, or pass --allow-pickle if you trust its source"
            )
    elif path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise InputError(f"model file '{path}' does not exist: check --model")
    elif path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise InputError(
                f"model folder '{path}' has no model_index.json: pass a diffusers pipeline folder "
                "(saved with save_pretrained) or a single .safetensors file"
            )
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"model '{model}' does not exist: pass a pipeline folder, a hub id, or toy-unet")


def _guess_single_file_family(path: pathlib.Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    joined = " ".join(keys[:5000])
    if "double_blocks." in joined or "single_transformer_blocks" in joined:
        return "flux"
    if "joint_blocks." in joined:
        return "sd3"
    if "conditioner.embedders.1" in joined:
        return "sdxl"
    if "model.diffusion_model." in joined:
        return "sd"
    raise InputError(f"cannot tell which model '{path}' is: pass --family (one of {', '.join(SINGLE_FILE_CLASSES)})")


def _folder_needs_pickle(path: pathlib.Path) -> bool:
    """True if some component of a pipeline folder has pickle weights but no safetensors."""
    for sub in path.iterdir():
        if not sub.is_dir():
            continue
        files = [f.name for f in sub.iterdir()]
        has_st = any(f.endswith(".safetensors") for f in files)
        has_pickle = any(f.endswith(PICKLE_SUFFIXES) for f in files)
        if has_pickle and not has_st:
            return True
    return False


def _needs_remote_code(path: pathlib.Path) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    for value in index.values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].endswith(".py"):
            return True
    return any(p.suffix == ".py" for p in path.iterdir())


def load_pipeline(
    model: str, *, family: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
):
    """Load a diffusers pipeline on the CPU in float32 (the caller moves and casts it)."""
    import torch
    import diffusers

    check_model_arg(model, allow_pickle=allow_pickle)
    target = resolve_model(model)
    path = pathlib.Path(target)
    kwargs = {"dtype": torch.float32}
    if path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        fam = family
        if fam is None and path.suffix.lower() == ".safetensors":
            fam = _guess_single_file_family(path)
        if fam not in SINGLE_FILE_CLASSES:
            raise InputError(
                f"single-file loading of '{path}' needs --family, one of {', '.join(SINGLE_FILE_CLASSES)}"
            )
        cls = getattr(diffusers, SINGLE_FILE_CLASSES[fam])
        try:
            return cls.from_single_file(str(path), **kwargs)
        except Exception as exc:  # missing cached config, mismatched keys
            raise InputError(
                f"could not load single file '{path}' as {cls.__name__} ({type(exc).__name__}): "
                "its diffusers config must be cached locally, or pass a pipeline folder"
            ) from None
    if path.is_dir():
        if _folder_needs_pickle(path) and not allow_pickle:
            raise InputError(
                f"model folder '{path}' has pickle (.bin) weights only: re-save it with safe_serialization=True, "
                "or pass --allow-pickle if you trust its source"
            )
        if _needs_remote_code(path) and not trust_remote_code:
            raise InputError(
                f"model folder '{path}' ships its own Python code: pass --trust-remote-code only if you trust it"
            )
    try:
        return diffusers.DiffusionPipeline.from_pretrained(
            target, use_safetensors=None if allow_pickle else True, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, EnvironmentError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not load model '{model}': {first}") from None
