"""Forward noising, as objects the core can use without knowing the model family.

Two conventions cover every family diffscrub supports:

* :class:`DDPMSchedule` (SD 1.x/2.x, SDXL, DiT, PixArt):
  ``z_t = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * eps`` with the model predicting eps,
  v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * z0, or z0 itself ("sample").
* :class:`FlowSchedule` (SD3, Flux): rectified flow, ``z_t = (1 - s) * z0 + s * eps`` with
  ``s = t / T`` and the model predicting the velocity ``eps - z0``.

Timesteps ``t`` are always in training units, float or long tensors in ``[0, T)`` with
``T = num_train_timesteps`` (1000 for every published model), so that a semantic band such as
``[300, 700)`` means the same thing on both conventions. Adapters convert ``t`` to whatever
their denoiser takes (Flux wants ``s`` in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # [B] -> [B, 1, 1, ...] matching the rank of `like`.
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule:
    """Forward process and conversions between what a model predicts and the clean latent."""

    num_train_timesteps: int
    prediction_type: str

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise coefficients ``(a_t, s_t)``, each ``[B]`` float32, for timesteps ``t [B]``."""
        raise NotImplementedError

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t = a_t * z0 + s_t * eps``; z0, eps ``[B, C, H, W]``, t ``[B]``."""
        a, s = self.coefficients(t.to(z0.device))
        return _expand(a, z0) * z0 + _expand(s, z0) * eps

    def target(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a model of this schedule is trained to predict at ``z_t`` (the denoising target)."""
        a, s = self.coefficients(t.to(z0.device))
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return _expand(a, z0) * eps - _expand(s, z0) * z0
        if self.prediction_type == "sample":
            return z0
        return eps - z0  # flow: velocity

    def predict_z0(self, z_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-latent estimate from a model prediction ``pred`` at ``z_t``."""
        a, s = self.coefficients(t.to(z_t.device))
        a, s = _expand(a, z_t), _expand(s, z_t)
        if self.prediction_type == "epsilon":
            return (z_t - s * pred) / a.clamp_min(1e-4)
        if self.prediction_type == "v_prediction":
            return a * z_t - s * pred
        if self.prediction_type == "sample":
            return pred
        return z_t - s * pred  # flow: z_t = z0 + s * (eps - z0)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``a_t^2 / s_t^2``, ``[B]`` float32 (large at small t)."""
        a, s = self.coefficients(t)
        return a.pow(2) / s.pow(2).clamp_min(1e-8)

    def sample_timesteps(
        self, batch: int, low: int = 0, high: int | None = None, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Uniform integer timesteps in ``[low, high)``, ``[B]`` long."""
        high = self.num_train_timesteps if high is None else high
        if not 0 <= low < high <= self.num_train_timesteps:
            raise ConfigError(
                f"timestep band [{low}, {high}) is outside the schedule's [0, {self.num_train_timesteps}): "
                "choose 0 <= low < high <= num_train_timesteps"
            )
        t = torch.randint(low, high, (batch,), generator=generator, device="cpu")
        return t.to(device)


@dataclass
class DDPMSchedule(NoiseSchedule):
    """Variance-preserving schedule from a table of cumulative alphas ``abar [T]``."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(
                f"prediction_type {self.prediction_type!r} is not a DDPM type: use epsilon, v_prediction or sample"
            )
        self.alphas_cumprod = self.alphas_cumprod.detach().double().cpu()
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])

    def coefficients(self, t):
        abar = self.alphas_cumprod.to(t.device)[t.long().clamp(0, self.num_train_timesteps - 1)]
        return abar.sqrt().float(), (1.0 - abar).sqrt().float()


@dataclass
class FlowSchedule(NoiseSchedule):
    """Rectified flow: ``z_t = (1 - s) z0 + s eps`` with ``s = t / T``; the model predicts ``eps - z0``."""

    num_train_timesteps: int = 1000
    prediction_type: str = "flow"

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def coefficients(self, t):
        s = self.sigmas(t)
        return 1.0 - s, s


def schedule_from_scheduler(scheduler) -> NoiseSchedule:
    """Build the forward schedule that a diffusers scheduler was trained with.

    Flow-matching schedulers (class name contains ``FlowMatch``) give a :class:`FlowSchedule`;
    every other scheduler is read as DDPM-style from its config (beta schedule, prediction type),
    because sampler classes (DDIM, DPM-Solver, Euler) share the training betas in their config.
    """
    name = type(scheduler).__name__
    cfg = scheduler.config
    if "FlowMatch" in name:
        return FlowSchedule(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        alphas_cumprod = DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg}).alphas_cumprod
    return DDPMSchedule(torch.as_tensor(alphas_cumprod), prediction_type=cfg.get("prediction_type", "epsilon"))
