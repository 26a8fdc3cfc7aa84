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
    one_step: bool = option(
        False,
        "distil the erased model into a one-step generator, as the paper does (score identity distillation with a "
        "second, fake score network trained in alternation); the output then samples in one denoiser call at "
        "--generator-t and `diffscrub eval` samples it that way",
    )
    generator_t: int = option(625, "--one-step: the timestep (training units) the generator is called at, on pure noise")
    sid_alpha: float = option(1.2, "--one-step: alpha of the score identity distillation loss (the paper's 1.2)")
    teacher_guidance: float = option(
        1.0, "--one-step: classifier-free guidance of the frozen model's score in the generator loss (baked into the "
        "generator, which samples without guidance)")
    fake_lr: float = option(0.0, "--one-step: learning rate of the fake score network (0 = the run's --lr)")

    def __post_init__(self):
        check_range("sfd.lambda_forget", self.lambda_forget, 0)
        check_range("sfd.lambda_keep", self.lambda_keep, 0)
        check_range("sfd.sample_steps", self.sample_steps, 1)
        check_range("sfd.sample_guidance", self.sample_guidance, 0)
        check_range("sfd.t_low", self.t_low, 0)
        check_range("sfd.t_high", self.t_high, self.t_low + 1)
        check_range("sfd.generator_t", self.generator_t, 1)
        check_range("sfd.sid_alpha", self.sid_alpha, 0)
        check_range("sfd.teacher_guidance", self.teacher_guidance, 0)
        check_range("sfd.fake_lr", self.fake_lr, 0)
