"""Tiny, randomly initialised diffusers pipelines for the test suite.

Each family uses the real diffusers pipeline class with miniature components
(two layers, two heads, widths around 32) so that code paths are exercised
exactly as with the released models, but a pipeline builds in well under a
second and samples a 32x32 image in a fraction of a second on a CPU.  Nothing
is downloaded: tokenizers come from :mod:`diffscrub.toy.tokenizers`.

Shapes, for a 32x32 RGB image:

* VAE: 32x32x3 -> 16x16 latents (one downsample), 4 latent channels.
* ``sd`` / ``sd-v`` / ``sdxl``: UNet with block_out_channels (32, 64); the
  mid block works on a 64x8x8 feature map.
* ``dit`` / ``pixart`` / ``sd3``: patch size 2, so an 8x8 grid of 64 tokens,
  hidden size 32, 2 blocks.
* ``flux``: 2x2 packed latents, 64 tokens of 16 channels, hidden size 32,
  2 double-stream + 2 single-stream blocks.

Use ``build_tiny_pipeline(name, seed)``; the same seed gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from diffscrub.toy.tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "FAMILIES",
    "PIPELINE_CLASSES",
    "IMAGE_SIZE",
    "LATENT_SIZE",
    "MAX_LENGTH",
    "DIGIT_LABELS",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "sample_kwargs",
]

FAMILIES = ("sd", "sd-v", "sdxl", "dit", "pixart", "sd3", "flux")

PIPELINE_CLASSES = {
    "sd": StableDiffusionPipeline,
    "sd-v": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "dit": DiTPipeline,
    "pixart": PixArtAlphaPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}

IMAGE_SIZE = 32  # pixels
LATENT_SIZE = 16  # latent grid side, after the VAE's single downsample
LATENT_CHANNELS = 4
MAX_LENGTH = 16  # tokenizer model_max_length and CLIP position embeddings
DIGIT_LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_HEADS = 2
_HEAD_DIM = 16
_WIDTH = _HEADS * _HEAD_DIM  # transformer hidden size: 32


class _Seeder:
    """Reseed the global torch RNG before each component, from one base seed.

    Seeding per component (rather than once) keeps a component's weights
    independent of what was built before it in the same pipeline.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.count = 0

    def __call__(self) -> None:
        torch.manual_seed(self.seed * 1000 + self.count)
        self.count += 1


def _vae(seed: _Seeder, *, scaling_factor: float, shift_factor: float | None = None, quant_conv: bool = True):
    seed()
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _clip_text(seed: _Seeder, tokenizer, *, with_projection: bool, hidden_size: int = 32, projection_dim: int = 32):
    seed()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _t5_encoder(seed: _Seeder, tokenizer, *, d_model: int = 32):
    seed()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=_HEAD_DIM,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _unet(seed: _Seeder, *, cross_attention_dim: int, sdxl: bool = False):
    seed()
    extra = {}
    if sdxl:
        # Micro-conditioning: 6 size numbers embedded with 8 channels each,
        # concatenated with text_encoder_2's pooled projection (32).
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=_HEADS,  # legacy name: this is the number of heads
        **extra,
    )


def _ddpm_betas(prediction_type: str = "epsilon") -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def _build_sd(seed: _Seeder, prediction_type: str):
    vae = _vae(seed, scaling_factor=0.18215)
    tokenizer = build_clip_tokenizer(max_length=MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, with_projection=False)
    unet = _unet(seed, cross_attention_dim=text_encoder.config.hidden_size)
    scheduler = DDIMScheduler(
        **_ddpm_betas(prediction_type),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: _Seeder):
    vae = _vae(seed, scaling_factor=0.13025)
    tokenizer = build_clip_tokenizer(max_length=MAX_LENGTH)
    tokenizer_2 = build_clip_tokenizer(max_length=MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, with_projection=False)
    text_encoder_2 = _clip_text(seed, tokenizer_2, with_projection=True)
    cross = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    unet = _unet(seed, cross_attention_dim=cross, sdxl=True)
    scheduler = EulerDiscreteScheduler(**_ddpm_betas(), steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _build_dit(seed: _Seeder):
    vae = _vae(seed, scaling_factor=0.18215)
    seed()
    transformer = DiTTransformer2DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma
        num_layers=2,
        sample_size=LATENT_SIZE,
        patch_size=2,
        # DiTPipeline hard-codes class 1000 as the classifier-free "null"
        # class, so the label table must keep ImageNet's 1000 classes.
        num_embeds_ada_norm=1000,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
    )
    id2label = {i: word for i, word in enumerate(DIGIT_LABELS)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    # DiTPipeline does not record id2label itself, so save_pretrained would
    # drop it; registering it writes it to model_index.json, from where
    # from_pretrained passes it back to __init__ (as the hub DiT folders do).
    pipe.register_to_config(id2label=id2label)
    return pipe


def _build_pixart(seed: _Seeder):
    vae = _vae(seed, scaling_factor=0.18215)
    tokenizer = build_t5_tokenizer(max_length=MAX_LENGTH)
    text_encoder = _t5_encoder(seed, tokenizer, d_model=32)
    seed()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma
        num_layers=2,
        cross_attention_dim=_WIDTH,
        sample_size=LATENT_SIZE,
        patch_size=2,
        caption_channels=text_encoder.config.d_model,
        use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _build_sd3(seed: _Seeder):
    vae = _vae(seed, scaling_factor=1.5, shift_factor=0.1, quant_conv=False)
    tokenizer = build_clip_tokenizer(max_length=MAX_LENGTH)
    tokenizer_2 = build_clip_tokenizer(max_length=MAX_LENGTH)
    tokenizer_3 = build_t5_tokenizer(max_length=MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, with_projection=True)
    text_encoder_2 = _clip_text(seed, tokenizer_2, with_projection=True)
    # The pipeline zero-pads the concatenated CLIP features (32 + 32) to T5's width.
    text_encoder_3 = _t5_encoder(seed, tokenizer_3, d_model=64)
    seed()
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=_WIDTH,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: _Seeder):
    vae = _vae(seed, scaling_factor=0.36, shift_factor=0.1, quant_conv=False)
    tokenizer = build_clip_tokenizer(max_length=MAX_LENGTH)
    tokenizer_2 = build_t5_tokenizer(max_length=MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, with_projection=False)
    text_encoder_2 = _t5_encoder(seed, tokenizer_2, d_model=32)
    seed()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latents
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


_BUILDERS = {
    "sd": lambda s: _build_sd(s, "epsilon"),
    "sd-v": lambda s: _build_sd(s, "v_prediction"),
    "sdxl": _build_sdxl,
    "dit": _build_dit,
    "pixart": _build_pixart,
    "sd3": _build_sd3,
    "flux": _build_flux,
}


def build_tiny_pipeline(name: str, seed: int = 0):
    """Build the tiny float32 CPU pipeline of family ``name`` (one of :data:`FAMILIES`).

    All weights are drawn from torch's global RNG seeded from ``seed`` (the
    caller's RNG state is restored afterwards), so equal seeds give equal
    weights.  Every torch module is put in eval mode.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        pipe = _BUILDERS[name](_Seeder(seed))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build family ``name`` and save it as a diffusers folder (safetensors) at ``path``."""
    path = Path(path)
    build_tiny_pipeline(name, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def sample_kwargs(name: str, *, steps: int = 2, seed: int = 0, prompt: str = "a photo of the digit seven") -> dict:
    """Keyword arguments that make pipeline family ``name`` sample one 32x32 image.

    Covers the per-family quirks: DiT takes ``class_labels`` instead of a
    prompt (the label of ``seven``); PixArt needs ``use_resolution_binning=False``
    (binning only knows sample sizes 32/64/128); Flux would default to 256x256
    (a fixed default_sample_size of 128), so height and width are always given;
    the T5-based families get
    ``max_sequence_length=MAX_LENGTH``.  Output is a float numpy array.
    """
    kwargs: dict = dict(
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    if name == "dit":
        kwargs["class_labels"] = [DIGIT_LABELS.index("seven")]
        return kwargs
    kwargs.update(prompt=prompt, height=IMAGE_SIZE, width=IMAGE_SIZE)
    if name in ("pixart", "sd3", "flux"):
        kwargs["max_sequence_length"] = MAX_LENGTH
    if name == "pixart":
        kwargs["use_resolution_binning"] = False
    return kwargs
