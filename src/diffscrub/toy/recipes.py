"""Architectures of the toy text-to-image models (configs only; training is in ``train.py``).

Two pipelines share one VAE (32x32 RGB <-> 4x16x16 latents, one downsample):

* ``toy-unet``: a ``StableDiffusionPipeline``: one small ``CLIPTextModel``, a
  ``UNet2DConditionModel`` with one downsample (16x16 -> 8x8 mid block), DDPM training
  schedule (1000 steps, epsilon prediction) and a ``DPMSolverMultistepScheduler`` saved as
  the sampler.
* ``toy-mmdit``: a ``StableDiffusion3Pipeline``: two small ``CLIPTextModelWithProjection``,
  a small ``T5EncoderModel``, an ``SD3Transformer2DModel`` (patch 2 -> 8x8 token grid) and a
  ``FlowMatchEulerDiscreteScheduler``.

Tokenizers come from :mod:`diffscrub.toy.tokenizers` (built locally, no download).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffscrub.toy.canvas import caption_words

MODEL_NAMES = ("toy-unet", "toy-mmdit")
TOKEN_LENGTH = 16  # CLIP/T5 tokenizer model_max_length
T5_SEQUENCE_LENGTH = 256  # what StableDiffusion3Pipeline pads T5 prompts to by default

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = {"toy-unet": 5.0, "toy-mmdit": 3.0}
"""Classifier-free guidance used by ``diffscrub toy quality``. toy-unet, 20 steps, 320 single-digit
samples: asked digit found 0.44 at 3.0, 0.51 at 5.0, 0.50 at 7.5 (background 1.00 at all three)."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one denoiser training run."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    flow_uniform_share: float = 0.1  # flow models: share of times drawn uniformly, the rest logit-normal
    n_canvases: int = 60000
    digit_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    extra: dict = field(default_factory=dict)


@dataclass
class VAEConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    n_canvases: int = 20000


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=False,
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def build_clip_tokenizer():
    from diffscrub.toy.tokenizers import build_clip_tokenizer as _build

    return _build(caption_words(), max_length=TOKEN_LENGTH)


def build_t5_tokenizer():
    from diffscrub.toy.tokenizers import build_t5_tokenizer as _build

    return _build(caption_words(), max_length=TOKEN_LENGTH)


def _clip_config(tokenizer, hidden: int, layers: int, heads: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


# ----------------------------------------------------------------------------- toy-unet

UNET_TEXT_DIM = 128


def build_unet_text_encoder(tokenizer):
    from transformers import CLIPTextModel

    return CLIPTextModel(_clip_config(tokenizer, UNET_TEXT_DIM, 2, 4, UNET_TEXT_DIM))


def unet_config() -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        # no attention at 16x16 (cost); cross-attention at 8x8 and in the 8x8 mid block
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=UNET_TEXT_DIM,
        attention_head_dim=4,  # number of heads (diffusers' historical naming)
        norm_num_groups=16,
        transformer_layers_per_block=1,
        # attention-pooled prompt added to the time embedding: global conditioning in every block
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def unet_train_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )


def build_unet_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**unet_train_scheduler_config(), clip_sample=False)


def build_unet_sampler():
    from diffusers import DPMSolverMultistepScheduler

    cfg = unet_train_scheduler_config()
    return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)


# ----------------------------------------------------------------------------- toy-mmdit

MMDIT_CLIP_DIM = 64
MMDIT_CLIP_PROJ = 32
MMDIT_T5_DIM = 128
MMDIT_HEADS = 3
MMDIT_HEAD_DIM = 32
MMDIT_LAYERS = 4


def build_mmdit_clip(tokenizer):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(_clip_config(tokenizer, MMDIT_CLIP_DIM, 2, 2, MMDIT_CLIP_PROJ))


def build_mmdit_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=MMDIT_T5_DIM,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = T5EncoderModel(cfg)
    # No relative position bias (fixed at zero, never trained): the encoder reads a caption as
    # a bag of words (all the captions need), and every <pad> position gets the same output.
    # That is what lets training run on a short sequence that stands exactly for the 256
    # padded positions StableDiffusion3Pipeline feeds (see train.py, "pad multiplicity").
    for block in model.encoder.block:
        attn = block.layer[0].SelfAttention
        if attn.has_relative_attention_bias:
            attn.relative_attention_bias.weight.data.zero_()
    return model


def transformer_config() -> dict:
    return dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=MMDIT_LAYERS,
        attention_head_dim=MMDIT_HEAD_DIM,
        num_attention_heads=MMDIT_HEADS,
        joint_attention_dim=MMDIT_T5_DIM,
        caption_projection_dim=MMDIT_HEADS * MMDIT_HEAD_DIM,
        pooled_projection_dim=2 * MMDIT_CLIP_PROJ,
        pos_embed_max_size=16,
    )


def build_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**transformer_config())


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
