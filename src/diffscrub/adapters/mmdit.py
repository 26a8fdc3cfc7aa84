"""Joint-attention transformers trained with rectified flow: SD3/SD3.5 (MMDiT) and Flux.

Their blocks carry two token streams and return ``(encoder_hidden_states, hidden_states)``:
text first, image second. Tapping ``output[0]`` as a generic hook would cluster *text*
tokens, so :meth:`image_tokens` takes the second element and checks its length against
the image-token grid.
"""

from __future__ import annotations

import torch

from .base import Conditioning, DenoiserAdapter, Features, mid_index

#: index of the image stream in a joint block's output tuple.
IMAGE_STREAM = 1


def _image_stream(output, n_tokens: int, family: str) -> torch.Tensor:
    feats = output[IMAGE_STREAM] if isinstance(output, (tuple, list)) else output
    if feats.ndim != 3 or feats.shape[1] != n_tokens:
        raise RuntimeError(f"{family}: tapped stream has shape {tuple(feats.shape)}, expected {n_tokens} image tokens")
    return feats  # [B, N, D]


class SD3Adapter(DenoiserAdapter):
    """SD3 / SD3.5: ``transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep)``
    with ``timestep = s * 1000`` (the pipeline passes scheduler timesteps in [0, 1000])."""

    family = "sd3"
    description = "SD3 / SD3.5 MMDiT (joint attention, flow matching)"
    pipeline_prefixes = ("StableDiffusion3",)
    denoiser_classes = ("SD3Transformer2DModel",)
    text_encoder_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    default_text_length = 256

    def _encode(self, prompts, image_hw):
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.denoiser.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=self.text_length(),
        )
        return Conditioning(prompts, {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()})

    def call(self, model, z_t, t, cond):
        return model(hidden_states=z_t, timestep=t.float(), **cond, return_dict=False)[0]

    def tap_module(self, model):
        # The last joint block is "context_pre_only": it returns (None, image). Keep the tap on a
        # full joint block (index 12 of SD3-medium's 24), also on models with only two blocks.
        n = len(model.transformer_blocks)
        return model.transformer_blocks[min(mid_index(n), max(n - 2, 0))]

    def image_tokens(self, output, z_t):
        p = self.denoiser.config.patch_size
        grid = (z_t.shape[-2] // p, z_t.shape[-1] // p)
        return Features(_image_stream(output, grid[0] * grid[1], self.family), grid)


class FluxAdapter(DenoiserAdapter):
    """Flux: latents packed into 2x2 patches ``[B, (H/2)(W/2), 4C]``, rotary ``img_ids``/``txt_ids``,
    a guidance embedding on the guidance-distilled models, and ``timestep = s`` in [0, 1].

    The core keeps latents unpacked ``[B, C, H, W]``; packing happens only around the call,
    so masks are ordinary spatial tensors. The tap is the middle of the concatenated stack of
    double-stream and single-stream blocks; both kinds return ``(text, image)``.
    """

    family = "flux"
    description = "Flux (packed 2x2 latents, img/txt ids, guidance embed, flow matching)"
    pipeline_prefixes = ("Flux",)
    denoiser_classes = ("FluxTransformer2DModel",)
    text_encoder_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    default_text_length = 512
    #: guidance value fed to the guidance embedding (the pipeline's default).
    guidance_scale: float = 3.5

    def _encode(self, prompts, image_hw):
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=self.denoiser.device, num_images_per_prompt=1,
            max_sequence_length=self.text_length(),
        )
        return Conditioning(prompts, {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()})

    @staticmethod
    def pack(z: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``, channel order (c, dy, dx) as Flux expects."""
        b, c, h, w = z.shape
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`pack`."""
        b, _, d = tokens.shape
        c = d // 4
        return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    @staticmethod
    def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
        """Rotary positions of packed image tokens ``[h2 * w2, 3]``: (0, row, col)."""
        rows = torch.arange(h2, device=device).repeat_interleave(w2)
        cols = torch.arange(w2, device=device).repeat(h2)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)

    def call(self, model, z_t, t, cond):
        b, _, h, w = z_t.shape
        text = cond["encoder_hidden_states"]
        extra = {}
        if model.config.get("guidance_embeds", False):
            extra["guidance"] = torch.full((b,), self.guidance_scale, device=z_t.device, dtype=z_t.dtype)
        out = model(
            hidden_states=self.pack(z_t),
            timestep=(t.float() / self.pipe.scheduler.config.get("num_train_timesteps", 1000)).to(z_t.dtype),
            img_ids=self.image_ids(h // 2, w // 2, z_t.device, z_t.dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=z_t.device, dtype=z_t.dtype),
            **cond,
            **extra,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    def tap_module(self, model):
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        return blocks[mid_index(len(blocks))]

    def image_tokens(self, output, z_t):
        grid = (z_t.shape[-2] // 2, z_t.shape[-1] // 2)
        return Features(_image_stream(output, grid[0] * grid[1], self.family), grid)
