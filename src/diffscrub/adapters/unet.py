"""UNet denoisers: Stable Diffusion 1.x/2.x (epsilon or v) and SDXL (micro-conditioning)."""

from __future__ import annotations

import torch

from .base import Conditioning, DenoiserAdapter, Features


class StableDiffusionAdapter(DenoiserAdapter):
    """SD 1.x / 2.x: ``unet(sample, timestep, encoder_hidden_states)``; features from ``mid_block``."""

    family = "sd"
    description = "SD 1.x / 2.x UNet (eps or v-prediction)"
    pipeline_prefixes = ("StableDiffusionPipeline", "StableDiffusionImg2Img", "StableDiffusionInpaint")
    denoiser_classes = ("UNet2DConditionModel",)
    denoiser_attr = "unet"

    def _encode(self, prompts, image_hw):
        device = self.denoiser.device
        embeds, _ = self.pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(list(prompts), {"encoder_hidden_states": embeds.float()})  # [P, L, D]

    def call(self, model, z_t, t, cond):
        return model(sample=z_t, timestep=t, **cond, return_dict=False)[0]

    def tap_module(self, model):
        return model.mid_block

    def image_tokens(self, output, z_t):
        feats = output[0] if isinstance(output, (tuple, list)) else output  # [B, C, Hf, Wf]
        b, c, hf, wf = feats.shape
        return Features(feats.permute(0, 2, 3, 1).reshape(b, hf * wf, c), (hf, wf))


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL: two text encoders, pooled text embeds and size/crop time ids as added conditioning.

    When the pipeline is set to use zeros for an empty prompt (``force_zeros_for_empty_prompt``),
    the null prompt is zeros here too, because that is the unconditional branch its sampler uses.
    """

    family = "sdxl"
    description = "SDXL UNet (pooled text embeds + time ids)"
    pipeline_prefixes = ("StableDiffusionXL",)
    denoiser_classes = ()
    text_encoder_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    @classmethod
    def matches(cls, pipe):
        # Custom pipeline classes: an SDXL UNet is the one with a second text encoder.
        return super().matches(pipe) or (
            type(getattr(pipe, "unet", None)).__name__ == "UNet2DConditionModel"
            and getattr(pipe, "text_encoder_2", None) is not None
        )

    def _encode(self, prompts, image_hw):
        device = self.denoiser.device
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        embeds, pooled = embeds.float(), pooled.float()  # [P, L, D], [P, Dp]
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        h, w = image_hw
        # (original size, crop top-left, target size): a full, uncropped canvas at the training size.
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).repeat(len(prompts), 1)
        return Conditioning(
            prompts,
            {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}},
        )
