"""Options of attention steering; the default loss is the seed's best (distraction)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, check_range, option

ATTENTION_LOSSES = ("resteer", "distract", "random")
RECON = ("denoise", "distill")


@dataclass
class AttentionConfig:
    attention_loss: str = option(
        "distract",
        "resteer: shrink the concept tokens' attention (seed Eq. 4); distract: make it uniform (Eq. 5); "
        "random: pull it to a fixed random attention pattern (Eq. 6)",
    )
    lambda_attn: float = option(1.0, "weight of the attention loss")
    lambda_recon: float = option(1.0, "weight of the reconstruction term that keeps the model drawing")
    recon: str = option(
        "denoise",
        "denoise: the standard denoising loss on the forget images under the concept prompt (and on --retain "
        "images under the pool prompts), as in the seed; distill: match the frozen model's prediction on the "
        "same inputs instead of the data target",
    )
    skip_outer: bool = option(False, "leave the first and last text-attention blocks out of the loss and frozen")
    t_low: int = option(0, "low end of the training timesteps (training units)")
    t_high: int = option(1000, "high end (exclusive) of the training timesteps")

    def __post_init__(self):
        check_choice("attention.attention_loss", self.attention_loss, ATTENTION_LOSSES)
        check_range("attention.lambda_attn", self.lambda_attn, 0)
        check_range("attention.lambda_recon", self.lambda_recon, 0)
        check_choice("attention.recon", self.recon, RECON)
        check_range("attention.t_low", self.t_low, 0)
        check_range("attention.t_high", self.t_high, self.t_low + 1)
