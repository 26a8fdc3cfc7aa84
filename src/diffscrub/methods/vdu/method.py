"""Variational Diffusion Unlearning (seed 002): a plasticity inducer that lowers the likelihood of
the forget images, bounded so it cannot diverge, plus a stability regulariser in parameter space.

Each step noises a batch of forget latents and computes the student's denoising loss on them,
``L_f = ||S(z_t, p) - target(z0, eps, t)||^2`` (mean channels; ``p`` the pool/null prompts or
the concept prompt). The objective is

    L = - min(L_f, cap * L_0)  +  gamma * sum_i F_i (theta_i - theta*_i)^2

* Plasticity inducer, bounded: raising ``L_f`` lowers the forget images' likelihood (the ELBO is a
  weighted denoising loss). Plain ascent diverges, so the raise is clipped at ``cap * L_0``, with
  ``L_0`` the frozen model's own loss on the forget images (measured once in ``prepare``): below
  the cap the term pushes ``L_f`` up, above it the term is constant (no gradient) and only the
  regulariser acts. The term is therefore bounded, ``-cap * L_0 <= -min(L_f, cap L_0) <= 0``.
* Stability regulariser: a diagonal Gaussian prior around ``theta*`` with per-parameter
  precision ``F``. With ``checkpoints`` (independent training runs of the same denoiser, as in the
  seed) ``F = 1 / (var + eps)``, the unbiased variance of each parameter across them; otherwise a
  diagonal empirical Fisher on the retain images, ``F = mean over batches of (dL_retain/dtheta)^2``
  (needs ``--retain``). ``theta*`` is the denoiser's own weights (``prior_mean="initial"``) or the
  checkpoints' mean (``prior_mean="checkpoints"``). Unless ``raw_precision``, F is divided by its mean over
  all trainable parameters, so ``gamma`` means the same on every model.

Works on every family (the forget term uses the conditioning pool, index 0 the null prompt).
With LoRA the regulariser acts on the LoRA parameters (Fisher only: checkpoints hold base weights).
"""

from __future__ import annotations

import pathlib

import torch

from ...errors import ConfigError
from ..base import METHODS, Method
from ..common import denoising_loss, noisy_forget, repeat_cond
from .config import VDUConfig


def bounded_plasticity(forget_loss: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(forget_loss, cap)``: the part of the forget loss the objective may raise (never above ``cap``)."""
    return torch.clamp(forget_loss, max=cap)


def stability(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
              precision: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over every named tensor of ``params``."""
    total = None
    for name, p in params.items():
        term = (precision[name] * (p - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _checkpoint_files(path: str) -> list[pathlib.Path]:
    p = pathlib.Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if files:
            return files
    raise ConfigError(f"vdu.checkpoints: {path!r} is not a .safetensors file or a folder holding one")


def checkpoint_precision(paths: list[str], names: dict[str, torch.Size], eps: float, device=None):
    """Per-parameter ``(precision, mean)`` from independent checkpoints: ``1 / (var + eps)``.

    ``names`` maps each parameter to its shape; the variance is the unbiased one across the
    checkpoints (Welford's update, one checkpoint in memory at a time).
    """
    from safetensors import safe_open

    if len(paths) < 2:
        raise ConfigError("vdu.checkpoints needs at least 2 checkpoints to estimate a variance")
    mean = {n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in names.items()}
    m2 = {n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in names.items()}
    for k, path in enumerate(paths, start=1):
        where = {}
        for f in _checkpoint_files(path):
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    where[key] = f
        missing = [n for n in names if n not in where]
        if missing:
            raise ConfigError(
                f"vdu.checkpoints: {path!r} has no tensor {missing[0]!r} ({len(missing)} missing): "
                "checkpoints must be state dicts of the same denoiser"
            )
        for f in sorted({where[n] for n in names}):
            with safe_open(str(f), framework="pt") as handle:
                for n, shape in names.items():
                    if where[n] != f:
                        continue
                    x = handle.get_tensor(n).to(device=device, dtype=torch.float32)
                    if x.shape != shape:
                        raise ConfigError(
                            f"vdu.checkpoints: {n!r} in {path!r} has shape {tuple(x.shape)}, the denoiser's is "
                            f"{tuple(shape)}"
                        )
                    delta = x - mean[n]
                    mean[n] += delta / k
                    m2[n] += delta * (x - mean[n])
    n = len(paths)
    precision = {name: 1.0 / (m2[name] / (n - 1) + eps) for name in names}
    return precision, mean


def normalize(precision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide every precision by the mean over all of them."""
    count = sum(v.numel() for v in precision.values())
    mean = sum(float(v.double().sum()) for v in precision.values()) / max(count, 1)
    if not mean > 0:
        raise ConfigError("vdu: the precision is zero everywhere (no gradient reached the trainable parameters)")
    return {k: v / mean for k, v in precision.items()}


@METHODS.register("vdu")
class VDU(Method):
    name = "vdu"
    config_class = VDUConfig
    needs = frozenset({"forget"})
    default_trainable = "full"
    #: whether --conditioning auto should add textual-inversion prompts to the pool
    #: (yes: raising the forget loss under the concept's words too is what erasure wants).
    inversion_pool = True

    @classmethod
    def check_inputs(cls, config: VDUConfig, *, retain, concept_prompt, **_) -> None:
        """Input checks that need no model (callable from the CLI's preflight as well)."""
        if not config.checkpoints and not retain:
            raise ConfigError("vdu needs --retain DIR or --vdu-checkpoints A,B (for the stability regulariser's precision)")
        if config.forget_prompt == "concept" and not concept_prompt:
            raise ConfigError("vdu.forget_prompt='concept' needs --concept-prompt TEXT (the concept's name)")
        for path in config.checkpoints:
            _checkpoint_files(path)

    def __init__(self, config: VDUConfig, ctx):
        super().__init__(config, ctx)
        self.check_inputs(config, retain=ctx.retain is not None, concept_prompt=ctx.concept_prompt)
        self.concept = ctx.concept_prompt if config.forget_prompt == "concept" else None
        self.trainable = {n: p for n, p in ctx.student.named_parameters() if p.requires_grad}
        if config.checkpoints and any("lora_" in n for n in self.trainable):
            raise ConfigError("vdu.checkpoints holds base weights and cannot weigh LoRA parameters: "
                              "use --trainable full/attention, or drop vdu.checkpoints to use the Fisher estimate")
        self.precision: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.baseline: float | None = None
        self._concept_cond = None

    # ------------------------------------------------------------------ phase 1
    def prepare_work(self, n_forget: int) -> int:
        cfg = self.config
        return cfg.baseline_batches + (len(cfg.checkpoints) if cfg.checkpoints else cfg.fisher_batches)

    def _forget_cond(self, b: int) -> dict:
        ctx = self.ctx
        if self.concept is not None:
            if self._concept_cond is None:
                self._concept_cond = ctx.encode_prompts([self.concept])
            return repeat_cond(self._concept_cond, b)
        return ctx.cond.take(ctx.prompt_index(b))

    @torch.no_grad()
    def measure_baseline(self, batch_size: int, progress=None) -> float:
        """The frozen model's mean denoising loss on forget batches (sets the plasticity cap)."""
        ctx, cfg = self.ctx, self.config
        losses = []
        for _ in range(cfg.baseline_batches):
            _, z0, eps, t, z_t = noisy_forget(ctx, batch_size, cfg.t_low, cfg.t_high)
            pred, _ = ctx.teacher_predict(z_t, t, self._forget_cond(z0.shape[0]))
            losses.append(float(denoising_loss(ctx, pred, z0, eps, t)))
            if progress:
                progress(1)
        return sum(losses) / len(losses)

    def fisher(self, batch_size: int, progress=None) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the retain denoising loss, one squared gradient per batch."""
        ctx, cfg = self.ctx, self.config
        names = list(self.trainable)
        params = [self.trainable[n] for n in names]
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for _ in range(cfg.fisher_batches):
            index = ctx.retain_sampler.next(batch_size)
            z0 = ctx.retain.sample(index, ctx.generator).to(ctx.device)
            eps = ctx.randn_like(z0)
            t = ctx.timesteps(z0.shape[0], cfg.t_low, cfg.t_high)
            pred = ctx.student_predict(ctx.schedule.add_noise(z0, eps, t), t, ctx.cond.take(ctx.prompt_index(z0.shape[0])))
            grads = torch.autograd.grad(denoising_loss(ctx, pred, z0, eps, t), params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g.detach().float().pow(2)
            if progress:
                progress(1)
        return {n: acc / cfg.fisher_batches for n, acc in zip(names, total)}

    def prepare(self, progress=None, batch_size: int = 8):
        ctx, cfg = self.ctx, self.config
        self.baseline = self.measure_baseline(batch_size, progress)
        if cfg.checkpoints:
            shapes = {n: p.shape for n, p in self.trainable.items()}
            precision, mean = checkpoint_precision(cfg.checkpoints, shapes, cfg.var_eps, device=ctx.device)
            if progress:
                progress(len(cfg.checkpoints))
        else:
            precision, mean = self.fisher(batch_size, progress), None
        self.precision = precision if cfg.raw_precision else normalize(precision)
        if cfg.prior_mean == "checkpoints":
            self.anchor = mean
        elif ctx.teacher is not None:
            # The frozen teacher holds the initial weights under the same names: no second copy.
            teacher = dict(ctx.teacher.named_parameters())
            self.anchor = {n: teacher[n].detach() for n in self.trainable}
        else:
            self.anchor = {n: p.detach().clone() for n, p in self.trainable.items()}
        return {
            "forget_loss_frozen": self.baseline,
            "precision_source": "checkpoints" if cfg.checkpoints else "fisher",
            "precision_mean": float(sum(float(v.sum()) for v in self.precision.values())
                                    / max(1, sum(v.numel() for v in self.precision.values()))),
        }

    # ------------------------------------------------------------------ phase 2
    @property
    def cap_value(self) -> float:
        return self.config.cap * self.baseline

    def loss(self, step: int, batch_size: int):
        ctx, cfg = self.ctx, self.config
        if self.precision is None:
            self.prepare(batch_size=batch_size)
        _, z0, eps, t, z_t = noisy_forget(ctx, batch_size, cfg.t_low, cfg.t_high)
        pred = ctx.student_predict(z_t, t, self._forget_cond(z0.shape[0]))
        l_f = denoising_loss(ctx, pred, z0, eps, t)
        plasticity = bounded_plasticity(l_f, self.cap_value)
        stab = stability(self.trainable, self.anchor, self.precision).to(l_f.device)
        total = -plasticity + cfg.gamma * stab
        return total, {"forget_loss": l_f.detach(), "plasticity": plasticity.detach(), "stability": stab.detach()}

    def artifacts(self):
        return {}
