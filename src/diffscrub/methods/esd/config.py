"""Options of ESD; defaults follow the paper (eta = 1, cross-attention training, generated latents)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, check_range, option

SOURCES = ("generate", "forget")


@dataclass
class ESDConfig:
    eta: float = option(1.0, "negative guidance: how far past the unconditional prediction the target is pushed")
    source: str = option(
        "generate",
        "where the noisy latents come from: generate (the frozen model samples from noise under the concept "
        "prompt down to the step's timestep, as in ESD) or forget (the forget images noised: cheaper)",
    )
    generate_steps: int = option(4, "sampler steps from pure noise to the training timestep (source=generate)")
    generate_guidance: float = option(3.0, "classifier-free guidance scale while generating (1 = conditional only)")
    t_low: int = option(0, "low end of the training timesteps (training units)")
    t_high: int = option(1000, "high end (exclusive) of the training timesteps")

    def __post_init__(self):
        check_range("esd.eta", self.eta, 0)
        check_choice("esd.source", self.source, SOURCES)
        check_range("esd.generate_steps", self.generate_steps, 1)
        check_range("esd.generate_guidance", self.generate_guidance, 0)
        check_range("esd.t_low", self.t_low, 0)
        check_range("esd.t_high", self.t_high, self.t_low + 1)
