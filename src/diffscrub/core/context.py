"""What a method sees during erasure: the adapter, the schedule, teacher and student calls,
cached latents and a conditioning pool. No model class is named here."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.base import Conditioning, DenoiserAdapter, Features
from ..schedules import NoiseSchedule


@dataclass
class LatentCache:
    """VAE posterior moments of a fixed image set, encoded once (the VAE is frozen).

    ``mean``/``std``: ``[N, C, H, W]`` in model latent space (scaled and shifted).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh posterior sample for images ``index [B]``: ``[B, C, H, W]``."""
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
        return mean + std * noise


class BatchSampler:
    """Seeded epochs over ``n`` items: each item once per epoch, in a fresh order each epoch."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self._order: list[int] = []

    def next(self, batch: int) -> torch.Tensor:
        out = []
        while len(out) < batch:
            if not self._order:
                self._order = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self._order.pop())
        return torch.tensor(out, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self._order = list(state["order"])


@dataclass
class ErasureContext:
    """Shared state for a method's ``prepare`` and ``loss``.

    Attributes:
        adapter: the family adapter.
        schedule: forward noising of this model.
        student: the trainable denoiser.
        teacher: the frozen denoiser (a copy), or ``None`` when the student carries LoRA and the
            teacher is the same module with its adapters disabled.
        forget / retain: cached latents of the forget and (optional) retain images.
        cond: the conditioning pool; index 0 is always the null prompt.
        generator: the CPU generator that every random draw of the run comes from.
        device / dtype: where and in which precision the denoisers run.
    """

    adapter: DenoiserAdapter
    schedule: NoiseSchedule
    student: nn.Module
    teacher: nn.Module | None
    forget: LatentCache
    retain: LatentCache | None
    cond: Conditioning
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype = torch.float32
    autocast: Any = field(default=contextlib.nullcontext)
    image_hw: tuple[int, int] = (0, 0)
    concept_prompt: str | None = None
    anchor_prompt: str = ""
    forget_sampler: BatchSampler | None = None
    retain_sampler: BatchSampler | None = None

    def __post_init__(self):
        self.forget_sampler = BatchSampler(len(self.forget), self.generator)
        if self.retain is not None:
            self.retain_sampler = BatchSampler(len(self.retain), self.generator)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning for extra prompts (e.g. a method's concept and anchor), on the run's device."""
        return self.adapter.encode_prompts(list(prompts), self.image_hw).to(self.device)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.forget.mean.shape[-2:])

    # ----------------------------------------------------------------- randomness
    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)

    def timesteps(self, batch: int, low: int = 0, high: int | None = None) -> torch.Tensor:
        return self.schedule.sample_timesteps(batch, low, high, generator=self.generator, device=self.device)

    def prompt_index(self, batch: int) -> torch.Tensor:
        """Uniform draws from the conditioning pool, ``[B]`` long."""
        return torch.randint(0, len(self.cond), (batch,), generator=self.generator)

    def null_index(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.long)

    # ----------------------------------------------------------------- denoiser calls
    @contextlib.contextmanager
    def _teacher_module(self):
        if self.teacher is not None:
            yield self.teacher
            return
        # LoRA: the teacher is the student's base weights; disabling the adapters for this call
        # gives the original model without a second copy in memory.
        self.student.disable_adapters()
        try:
            yield self.student
        finally:
            self.student.enable_adapters()

    @torch.no_grad()
    def teacher_predict(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: dict, *, features: bool = False
    ) -> tuple[torch.Tensor, Features | None]:
        """Frozen-teacher prediction ``[B, C_out, H, W]`` (and tapped features), without gradients."""
        with self._teacher_module() as model, self.adapter.eval_mode(model), self.autocast():
            pred, feats = self.adapter.predict(model, z_t.to(self.dtype), t, cond, features=features)
        return pred.float(), feats

    def student_predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        with self.autocast():
            pred, _ = self.adapter.predict(self.student, z_t, t, cond)
        return pred.float()

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [x.to(self.device) for x in tensors]
