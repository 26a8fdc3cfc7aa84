"""Saving the toy models as plain diffusers pipeline folders, and loading the shared VAE back."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from diffscrub.toy import recipes as R


def _half(module):
    return copy.deepcopy(module).to(torch.float16).eval()


def _float(module):
    return copy.deepcopy(module).to(torch.float32).eval()


# Text encoders are stored in float32: transformers loads a checkpoint in its stored dtype
# by default while diffusers loads models in float32, so float16 text encoders would break a
# plain ``DiffusionPipeline.from_pretrained(folder)`` on CPU. They are small anyway.

def save_unet_pipeline(out: Path, vae, tok, te, unet, half: bool = True) -> Path:
    from diffusers import StableDiffusionPipeline

    conv = _half if half else (lambda m: m)
    pipe = StableDiffusionPipeline(
        vae=conv(vae),
        text_encoder=_float(te),
        tokenizer=tok,
        unet=conv(unet),
        scheduler=R.build_unet_sampler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def save_mmdit_pipeline(out: Path, vae, tok, clip1, tok2, clip2, t5tok, t5, tr, half: bool = True) -> Path:
    from diffusers import StableDiffusion3Pipeline

    conv = _half if half else (lambda m: m)
    pipe = StableDiffusion3Pipeline(
        transformer=conv(tr),
        scheduler=R.build_flow_scheduler(),
        vae=conv(vae),
        text_encoder=_float(clip1),
        tokenizer=tok,
        text_encoder_2=_float(clip2),
        tokenizer_2=tok2,
        text_encoder_3=_float(t5),
        tokenizer_3=t5tok,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def load_vae(folder: str | Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval().requires_grad_(False)
