"""Full-size denoiser architectures from their published configs, randomly initialised.

``diffscrub bench-speed --arch NAME`` measures the training step on these, where no weights can
be downloaded. The denoiser and the VAE have the published shapes (numbers copied from the
released ``config.json`` files); the text encoders keep their published widths (so the
conditioning the denoiser sees has the real shape) but only one layer each: they run once
before training, never inside the step, so their depth changes neither the step's time nor its
activation memory, only the weights resident beside it (noted in the README). Tokenizers are the
toy world's, padded to the real sequence lengths.

Everything is built directly on the target device and in the target dtype (``torch.device``
context and default dtype), so a 12B-parameter Flux transformer is never materialised in fp32
on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    name: str
    pipeline: str  # diffusers pipeline class
    denoiser: Callable[[], Any]
    vae: Callable[[], Any]
    native_resolution: int
    #: published parameter count of the denoiser, in millions (checked in the tests)
    denoiser_params_m: float


def _unet_sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def _unet_sdxl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )


def _sd3_medium():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )


def _flux_dev():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def _vae(latent_channels: int, scaling: float, shift: float | None):
    def build():
        from diffusers import AutoencoderKL

        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=scaling,
            shift_factor=shift, use_quant_conv=shift is None, use_post_quant_conv=shift is None,
        )

    return build


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("sd15", "StableDiffusionPipeline", _unet_sd15, _vae(4, 0.18215, None), 512, 859.5),
        Architecture("sdxl", "StableDiffusionXLPipeline", _unet_sdxl, _vae(4, 0.13025, None), 1024, 2567.5),
        Architecture("sd3-medium", "StableDiffusion3Pipeline", _sd3_medium, _vae(16, 1.5305, 0.0609), 1024, 2028.3),
        Architecture("flux-dev", "FluxPipeline", _flux_dev, _vae(16, 0.3611, 0.1159), 1024, 11901.4),
    )
}


def _clip(width: int, projection: int | None, tokenizer, max_len: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=1, num_attention_heads=max(1, width // 64),
                         max_position_embeddings=max_len, projection_dim=projection or width,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                   num_heads=64, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   is_encoder_decoder=False, use_cache=False))


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def count_denoiser_params(name: str) -> int:
    """Parameters of the architecture's denoiser, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in architecture(name).denoiser().parameters())


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_pipeline(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised full-size pipeline of architecture ``name`` on ``device`` in ``dtype``."""
    import diffusers
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from ..toy.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    arch = architecture(name)
    device = torch.device(device)
    clip_tok = build_clip_tokenizer(max_length=77)
    with _building(device, dtype):
        parts: dict[str, Any] = {"vae": arch.vae()}
        if name in ("sd15", "sdxl"):
            parts["unet"] = arch.denoiser()
            parts["scheduler"] = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               clip_sample=False, steps_offset=1)
            parts["tokenizer"] = clip_tok
            if name == "sd15":
                parts.update(text_encoder=_clip(768, None, clip_tok), safety_checker=None, feature_extractor=None,
                             requires_safety_checker=False)
            else:
                parts.update(text_encoder=_clip(768, None, clip_tok), text_encoder_2=_clip(1280, 1280, clip_tok),
                             tokenizer_2=build_clip_tokenizer(max_length=77))
        else:
            parts["transformer"] = arch.denoiser()
            t5_tok = build_t5_tokenizer(max_length=256 if name == "sd3-medium" else 512)
            if name == "sd3-medium":
                parts.update(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             text_encoder=_clip(768, 768, clip_tok), tokenizer=clip_tok,
                             text_encoder_2=_clip(1280, 1280, clip_tok), tokenizer_2=build_clip_tokenizer(max_length=77),
                             text_encoder_3=_t5(t5_tok), tokenizer_3=t5_tok)
            else:
                parts.update(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                                       base_shift=0.5, max_shift=1.15),
                             text_encoder=_clip(768, None, clip_tok), tokenizer=clip_tok,
                             text_encoder_2=_t5(t5_tok), tokenizer_2=t5_tok)
    return getattr(diffusers, arch.pipeline)(**parts)
