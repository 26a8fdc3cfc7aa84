"""Options of score forgetting distillation."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_range, option


@dataclass
class SFDConfig:
    lambda_forget: float = option(1.0, "weight of the forgetting term: S(z_t, concept) -> T(z_t, anchor)")
    lambda_keep: float = option(1.0, "weight of the score-distillation regulariser: S(z_t, p) -> T(z_t, p), p in the pool")
    sample_steps: int = option(4, "sampler steps of the frozen model from pure noise to each step's timestep")
    sample_guidance: float = option(1.0, "classifier-free guidance scale while generating (1 = conditional only)")
    t_low: int = option(0, "low end of the training timesteps (training units)")
    t_high: int = option(1000, "high end (exclusive) of the training timesteps")

    def __post_init__(self):
        check_range("sfd.lambda_forget", self.lambda_forget, 0)
        check_range("sfd.lambda_keep", self.lambda_keep, 0)
        check_range("sfd.sample_steps", self.sample_steps, 1)
        check_range("sfd.sample_guidance", self.sample_guidance, 0)
        check_range("sfd.t_low", self.t_low, 0)
        check_range("sfd.t_high", self.t_high, self.t_low + 1)
