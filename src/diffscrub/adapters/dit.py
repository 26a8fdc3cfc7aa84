"""Patch-token transformers with a plain block stack: DiT (class-conditional) and PixArt-α/Σ (T5 text).

Both predict ``[B, 2C, H, W]`` (epsilon and learned variance) and run their blocks on the
image tokens alone, so a mid block's output is already ``[B, N, D]`` image tokens on the
``(H / p, W / p)`` patch grid.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import Conditioning, DenoiserAdapter, Features, mid_index


class _PatchTransformerAdapter(DenoiserAdapter):
    def tap_module(self, model):
        return model.transformer_blocks[mid_index(len(model.transformer_blocks))]

    def image_tokens(self, output, z_t):
        feats = output[0] if isinstance(output, (tuple, list)) else output  # [B, N, D]
        p = self.denoiser.config.patch_size
        grid = (z_t.shape[-2] // p, z_t.shape[-1] // p)
        if feats.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"{self.family}: tapped {feats.shape[1]} tokens, expected {grid[0]}x{grid[1]}")
        return Features(feats, grid)


class DiTAdapter(_PatchTransformerAdapter):
    """DiT: ``transformer(hidden_states, timestep, class_labels)``. Prompts are class names; ``""`` is the
    null class (index ``num_embeds_ada_norm``) that classifier-free guidance uses."""

    family = "dit"
    description = "DiT (class-conditional, learned sigma)"
    pipeline_prefixes = ("DiTPipeline",)
    denoiser_classes = ("DiTTransformer2DModel",)
    has_text_encoder = False
    text_encoder_pairs = ()
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def class_ids(self, prompts: list[str]) -> list[int]:
        null = int(self.denoiser.config.num_embeds_ada_norm)
        labels = getattr(self.pipe, "labels", {}) or {}
        ids = []
        for p in prompts:
            if p == "":
                ids.append(null)
            elif p in labels:
                ids.append(int(labels[p]))
            elif p.isdigit() and int(p) < null:
                ids.append(int(p))
            else:
                known = ", ".join(list(labels)[:8]) or "class indices"
                raise InputError(f"DiT prompt {p!r} is not a class label of this model: use one of {known}, ...")
        return ids

    def pipeline_inputs(self, prompts, image_hw):
        # DiTPipeline samples at its native size and has no null class in its inputs: an empty prompt
        # means "any class", drawn uniformly.
        ids = [i if i != int(self.denoiser.config.num_embeds_ada_norm) else None for i in self.class_ids(list(prompts))]
        labels = sorted(set((getattr(self.pipe, "labels", {}) or {}).values())) or list(range(10))
        rng = torch.Generator().manual_seed(len(prompts))
        ids = [i if i is not None else labels[int(torch.randint(len(labels), (1,), generator=rng))] for i in ids]
        return {"class_labels": ids}

    def _encode(self, prompts, image_hw):
        ids = torch.tensor(self.class_ids(list(prompts)), dtype=torch.long, device=self.denoiser.device)
        return Conditioning(list(prompts), {"class_labels": ids})  # [P]

    def call(self, model, z_t, t, cond):
        return model(hidden_states=z_t, timestep=t, **cond, return_dict=False)[0]


class PixArtAdapter(_PatchTransformerAdapter):
    """PixArt-α/Σ: T5 text through cross-attention, with resolution/aspect-ratio conditioning on
    the 1024 px models (``use_additional_conditions``)."""

    family = "pixart"
    description = "PixArt-α / Σ (T5 cross-attention, learned sigma)"
    pipeline_prefixes = ("PixArt",)
    denoiser_classes = ("PixArtTransformer2DModel",)
    default_text_length = 120  # PixArt-alpha's; PixArt-Sigma's pipeline says 300

    def pipeline_inputs(self, prompts, image_hw):
        # Resolution binning snaps to the 256-1024 px tables; erasure trains at the images' own size.
        return {**super().pipeline_inputs(prompts, image_hw), "use_resolution_binning": False}

    def _encode(self, prompts, image_hw):
        device = self.denoiser.device
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=self.text_length(),
        )
        n = len(prompts)
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            h, w = image_hw
            added = {
                "resolution": torch.tensor([[h, w]], dtype=torch.float32, device=device).repeat(n, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32, device=device).repeat(n, 1),
            }
        return Conditioning(
            list(prompts),
            {"encoder_hidden_states": embeds.float(), "encoder_attention_mask": mask, "added_cond_kwargs": added},
        )

    def call(self, model, z_t, t, cond):
        return model(hidden_states=z_t, timestep=t, **cond, return_dict=False)[0]
