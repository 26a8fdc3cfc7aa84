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
    #: this process's slice of each draw when the batch is split over ``world`` processes.
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        return self.mean.shape[0]

    @classmethod
    @torch.no_grad()
    def encode(cls, adapter, images: torch.Tensor, batch_size: int) -> "LatentCache":
        """Encode ``images [N, 3, H, W]`` (uint8 pixels, or floats in [-1, 1]) in chunks of ``batch_size``:
        a VAE at 1024 px holds 0.25-0.5 GiB per image in each full-resolution activation, so a whole image
        set at once runs out of memory; uint8 pixels become floats a chunk at a time."""
        from ..data.images import to_float

        means, stds = [], []
        for start in range(0, images.shape[0], batch_size):
            m, s = adapter.encode_moments(to_float(images[start:start + batch_size]))
            means.append(m.cpu())
            stds.append(s.cpu())
        return cls(torch.cat(means), torch.cat(stds))

    def extend(self, other: "LatentCache") -> "LatentCache":
        """This cache with ``other``'s images after its own (same split over processes)."""
        return LatentCache(torch.cat([self.mean, other.mean]), torch.cat([self.std, other.std]), self.rank, self.world)

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh posterior sample for images ``index [B]``: ``[B, C, H, W]``.

        Split over ``world`` processes, ``index`` is this rank's part of the global batch: the noise is
        drawn for the whole global batch (as one process would) and this rank's rows are kept.
        """
        mean, std = self.mean[index], self.std[index]
        noise = _draw_slice(lambda n: torch.randn((n, *mean.shape[1:]), generator=generator, device="cpu"),
                            mean.shape[0], self.rank, self.world)
        return mean + std * noise.to(mean.device)


def _draw_slice(draw, batch: int, rank: int, world: int) -> torch.Tensor:
    """``draw(batch)``, or with ``world`` processes this rank's ``batch`` rows of ``draw(batch * world)``."""
    if world == 1:
        return draw(batch)
    return draw(batch * world)[rank * batch:(rank + 1) * batch]


class BatchSampler:
    """Seeded epochs over ``n`` items: each item once per epoch, in a fresh order each epoch."""

    def __init__(self, n: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        self.n, self.generator = n, generator
        self.rank, self.world = rank, world
        self._order: list[int] = []

    def next(self, batch: int) -> torch.Tensor:
        """``batch`` indices; over ``world`` processes, this rank's part of a global batch of ``batch * world``."""
        return _draw_slice(self._next, batch, self.rank, self.world)

    def _next(self, batch: int) -> torch.Tensor:
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
        rank / world: this process and the number of processes a training batch is split over
            (see :meth:`shard`); 0 and 1 in a single-process run.
        student_forward: what :meth:`student_predict` calls (the DDP-wrapped student when several
            processes train, compiled with ``--compile``); ``None`` means ``student``.
        teacher_forward: the compiled teacher (``--compile``), for calls that tap no features.
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
    rank: int = 0
    world: int = 1
    student_forward: Any = None
    teacher_forward: Any = None
    #: images added to ``forget`` after it was encoded (``--name-samples``), kept apart for checkpoints.
    forget_extra: LatentCache | None = None
    #: the student's learning rate (``--lr``), for a method that trains a second network beside it.
    lr: float = 1e-4
    #: the concept's names as this run uses them (``--names``, else the inversion's first ``--name-words``);
    #: set when Phase 1 names the concept, empty when it does not.
    names: list[str] = field(default_factory=list)
    #: the name templates as this run uses them (``--name-contexts``, then the ``--random-contexts`` drawn); set
    #: when Phase 1 names the concept, empty when it does not.
    contexts: list[str] = field(default_factory=list)
    #: with ``--leave-out-candidates``: every word the inversion weighed as a name (its nearest words, or all the
    #: ``--inversion-rerank`` candidates), which vocabulary draws leave out beside ``names``; else empty.
    suspects: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.forget_sampler = BatchSampler(len(self.forget), self.generator)
        if self.retain is not None:
            self.retain_sampler = BatchSampler(len(self.retain), self.generator)
        self.shard(self.rank, self.world)

    def shard(self, rank: int, world: int) -> None:
        """Split every batch-shaped draw over ``world`` processes (``1``: no split).

        Each draw is then made at the global batch size (the batch the caller asks for times ``world``)
        from the shared generator, which all ranks hold in the same state, and this rank keeps rows
        ``rank * b : (rank + 1) * b``: the random stream, and each sample's draws, are those of one
        process running the global batch. Draws of :meth:`randn_like` treat dim 0 as the batch.
        """
        self.rank, self.world = rank, world
        for part in (self.forget, self.retain, self.forget_sampler, self.retain_sampler):
            if part is not None:
                part.rank, part.world = rank, world

    def add_forget(self, extra: LatentCache) -> None:
        """Append images to the forget set before any batch is drawn (the sampler's epochs then cover them)."""
        self.forget = self.forget.extend(extra)
        self.forget_extra = extra if self.forget_extra is None else self.forget_extra.extend(extra)
        self.forget_sampler.n = len(self.forget)

    def generate_latents(self, prompts: list[str], *, steps: int, seed: int, batch_size: int,
                         progress=None) -> LatentCache:
        """Sample one image per prompt with the pipeline as it is now, and encode them: a cache of ``len(prompts)``.

        In chunks of ``batch_size`` prompts, chunk ``i`` seeded with ``seed`` plus its first index: all 32 contrast
        samples in one pipeline call ran SDXL out of memory at 1024 px on an H100 (16 GiB for one VAE-decoder
        convolution) where the training step fits in 20. ``progress(n)`` is called after each chunk."""
        chunks = []
        for start in range(0, len(prompts), batch_size):
            chunks.append(self.adapter.generate(prompts[start:start + batch_size], self.image_hw, steps=steps,
                                                seed=seed + start))  # [b, 3, H, W] in [-1, 1], on the CPU
            if progress:
                progress(len(chunks[-1]))
        return LatentCache.encode(self.adapter, torch.cat(chunks), batch_size)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning for extra prompts (e.g. a method's concept and anchor), on the run's device."""
        return self.adapter.encode_prompts(list(prompts), self.image_hw).to(self.device)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.forget.mean.shape[-2:])

    # ----------------------------------------------------------------- randomness
    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        noise = _draw_slice(lambda n: torch.randn((n, *x.shape[1:]), generator=self.generator), x.shape[0],
                            self.rank, self.world)
        return noise.to(x.device, x.dtype)

    def randn(self, batch: int, *shape: int) -> torch.Tensor:
        """Standard normal ``[batch, *shape]`` on the run's device (batch-shaped: split like the others)."""
        noise = _draw_slice(lambda n: torch.randn((n, *shape), generator=self.generator), batch, self.rank,
                            self.world)
        return noise.to(self.device)

    def timesteps(self, batch: int, low: int = 0, high: int | None = None) -> torch.Tensor:
        if self.world == 1:
            return self.schedule.sample_timesteps(batch, low, high, generator=self.generator, device=self.device)
        t = _draw_slice(lambda n: self.schedule.sample_timesteps(n, low, high, generator=self.generator), batch,
                        self.rank, self.world)
        return t.to(self.device)

    def randint(self, low: int, high: int, batch: int) -> torch.Tensor:
        """Uniform integers in ``[low, high)``, ``[B]`` long: this rank's rows of the global batch's draw."""
        return _draw_slice(lambda n: torch.randint(low, high, (n,), generator=self.generator), batch,
                           self.rank, self.world)

    def prompt_index(self, batch: int) -> torch.Tensor:
        """Uniform draws from the conditioning pool, ``[B]`` long (never a vocabulary anchor)."""
        return self.randint(0, self.cond.pool_len, batch)

    def anchor_index(self, batch: int) -> torch.Tensor | None:
        """Uniform draws from the vocabulary anchors, ``[B]`` long pool indices; ``None`` when there are none."""
        first, total = self.cond.pool_len, len(self.cond)
        return None if first == total else self.randint(first, total, batch)

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

    def teacher_predict(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: dict, *, features: bool = False, grad: bool = False
    ) -> tuple[torch.Tensor, Features | None]:
        """Frozen-teacher prediction ``[B, C_out, H, W]`` (and tapped features), without gradients.

        ``grad=True`` keeps the graph to ``z_t`` (the teacher's weights stay frozen): a loss that
        differentiates the teacher's score through its input (SFD's one-step generator) needs it.
        """
        with torch.set_grad_enabled(grad), self._teacher_module() as model, self.adapter.eval_mode(model), \
                self.autocast():
            # a compiled teacher would skip the feature tap's forward hook: tapped calls run the eager module
            call = model if features or self.teacher_forward is None else self.teacher_forward
            pred, feats = self.adapter.predict(call, z_t.to(self.dtype), t, cond, features=features)
        return pred.float(), feats

    def teacher_grid(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, batch_size: int):
        """The frozen teacher under every prompt of ``cond`` at every latent of ``z_t [N, C, H, W]`` (at
        ``t [N]``), ``batch_size`` (latent, prompt) pairs a call: yields ``(latents, prompts, pred)``, with
        ``latents``, ``prompts`` ``[B]`` the pairs' indices and ``pred [B, C, H, W]`` (variance channels
        dropped). Scoring words on the same noisy latents, rather than each on its own draws, keeps the
        spread of the error over ``t`` and the images out of the differences between words."""
        n, p = len(z_t), len(cond)
        for pairs in torch.arange(n * p).split(batch_size):
            latents, prompts = pairs // p, pairs % p  # latent-major: a latent's prompts share a call
            pred, _ = self.teacher_predict(z_t[latents].to(self.device), t[latents].to(self.device),
                                           cond.take(prompts))
            yield latents, prompts, self.adapter.split_variance(pred, z_t.shape[1])[0]

    def student_predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        model = self.student if self.student_forward is None else self.student_forward
        with self.autocast():
            pred, _ = self.adapter.predict(model, z_t, t, cond)
        return pred.float()

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [x.to(self.device) for x in tensors]
