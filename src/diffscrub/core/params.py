"""Choosing what trains: the full denoiser, its attention layers, or LoRA adapters through peft."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import DenoiserAdapter
from ..errors import ConfigError

ADAPTER_NAME = "diffscrub"


def select_trainable(adapter: DenoiserAdapter, model: nn.Module, mode: str, *, rank: int = 0,
                     alpha: float | None = None) -> list[str]:
    """Set ``requires_grad`` for ``mode`` and return the trainable parameter names.

    Args:
        mode: ``full`` (every parameter), ``attention`` (parameters of attention modules), or
            ``cross-attention`` (text-to-image attention), ``text-kv`` (only its projections of the
            text: keys and values), or ``lora`` (rank-``rank`` LoRA on the adapter's target modules; base weights frozen).
    """
    model.requires_grad_(False)
    if mode == "full":
        model.requires_grad_(True)
    elif mode in ("attention", "cross-attention", "text-kv"):
        names = set(adapter.attention_parameters(model, cross_only=mode == "cross-attention",
                                                 text_kv_only=mode == "text-kv"))
        if not names:
            raise ConfigError(f"trainable={mode!r}: the {adapter.family} denoiser has no such attention parameters")
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
    elif mode == "lora":
        from peft import LoraConfig

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {
            ".".join(n.rsplit(".", 2)[-2:]) for n, _ in model.named_modules()
        }
        targets = [t for t in adapter.lora_target_modules if t in present]
        if not targets:
            raise ConfigError(
                f"no LoRA target modules ({', '.join(adapter.lora_target_modules)}) found in the {adapter.family} "
                "denoiser: use --trainable full or attention"
            )
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        raise ConfigError(f"trainable={mode!r} is not valid: choose full, attention, cross-attention, text-kv or lora")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA deltas into the base weights and remove the peft wrappers, in place."""
    model.fuse_lora(adapter_names=[ADAPTER_NAME])
    model.unload_lora()
    return model
