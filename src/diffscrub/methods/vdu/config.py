"""Options of VDU."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, check_range, option
from ...errors import ConfigError

PRIOR_MEANS = ("initial", "checkpoints")
FORGET_PROMPTS = ("pool", "concept")


@dataclass
class VDUConfig:
    gamma: float = option(1.0, "weight of the stability regulariser sum_i F_i (theta_i - theta*_i)^2")
    cap: float = option(
        3.0,
        "bound of the plasticity inducer: the forget loss is raised only until it reaches cap x the frozen "
        "model's own forget loss (measured in prepare), so the objective cannot diverge",
    )
    checkpoints: list[str] = option(
        [],
        "independent checkpoints of the same denoiser (.safetensors state dicts, or folders holding one): "
        "precision = 1 / (variance across them + eps); without them, a diagonal Fisher on --retain images",
        cli="--vdu-checkpoints",
    )
    prior_mean: str = option("initial", "theta*: initial (the denoiser's own weights) or checkpoints (their mean)")
    var_eps: float = option(1e-8, "added to the checkpoint variance before inverting it")
    fisher_batches: int = option(8, "retain batches for the diagonal Fisher estimate (no checkpoints)")
    baseline_batches: int = option(2, "forget batches for the frozen model's forget loss, which sets the cap")
    raw_precision: bool = option(False, "use the precision as estimated; by default it is divided by its mean over "
                                 "all trainable parameters so that gamma is scale-free")
    forget_prompt: str = option("pool", "conditioning of the forget images: pool (null/--prompts) or concept "
                                "(--concept-prompt)")
    t_low: int = option(0, "low end of the training timesteps (training units)")
    t_high: int = option(1000, "high end (exclusive) of the training timesteps")

    def __post_init__(self):
        check_range("vdu.gamma", self.gamma, 0)
        check_range("vdu.cap", self.cap, 0, low_open=True)
        if len(self.checkpoints) == 1:
            raise ConfigError("vdu.checkpoints needs at least 2 checkpoints to estimate a variance")
        check_choice("vdu.prior_mean", self.prior_mean, PRIOR_MEANS)
        if self.prior_mean == "checkpoints" and not self.checkpoints:
            raise ConfigError("vdu.prior_mean='checkpoints' needs vdu.checkpoints")
        check_range("vdu.var_eps", self.var_eps, 0, low_open=True)
        check_range("vdu.fisher_batches", self.fisher_batches, 1)
        check_range("vdu.baseline_batches", self.baseline_batches, 1)
        check_choice("vdu.forget_prompt", self.forget_prompt, FORGET_PROMPTS)
        check_range("vdu.t_low", self.t_low, 0)
        check_range("vdu.t_high", self.t_high, self.t_low + 1)
