"""SFD's one-step generator: score identity distillation with the forgetting override (``--one-step``).

The paper (Chen, Zhang and Zhou) builds SFD on score identity distillation (SiD, Zhou et al. 2024):
three networks, all started from the pretrained denoiser.

* the generator ``G`` (the student, the network that is saved): ``x_g = z0_hat(G(z, t_g, c))``, the
  clean-latent estimate of one denoiser call on pure noise ``z ~ N(0, I)`` at the fixed timestep
  ``t_g = --generator-t`` (SiD-LSG uses 625 on Stable Diffusion);
* the frozen teacher ``T`` (the "real" score) and
* a fake score network ``F`` that tracks the generator's own distribution.

Each step alternates (SiD's Algorithm 1):

1. ``F`` takes one AdamW step on the plain denoising loss of generator samples (no gradient into
   ``G``): ``||F(x_t, t, c) - target(x_g, eps, t)||^2`` with ``x_t = add_noise(x_g, eps, t)``.
2. ``G`` is trained on, in clean-latent space (``D = z0_hat``, per sample, element means)::

       L_G = w * (D_T - D_F) . ((D_T - x_g) - alpha (D_T - D_F)),   w = 1 / sg(mean |x_g - D_T|)

   which is SiD's ``(1 - alpha) ||D_T - D_F||^2 + (D_T - D_F) . (D_F - x_g)``; gradients reach ``G``
   through ``x_g`` and through ``x_t`` inside both frozen score networks.

The forgetting (SFD's Lemma 1): for the concept's samples ``D_T`` is the teacher's score under the
*anchor* prompt, not the concept's, so the generator's conditional distribution for the concept is
pulled to the anchor's, while every pool prompt keeps its own score. ``--teacher-guidance`` applies
classifier-free guidance to ``D_T`` (SiD-LSG's guidance, baked into a generator that then samples
without it).
"""

from __future__ import annotations

import copy

import torch

from ...adapters.base import concat_kwargs
from ...errors import ConfigError
from ..common import denoising_loss, guided, latent_channels, mean_part


class OneStepDistiller:
    """The fake score network, its optimiser and the two SiD updates; the student is the generator."""

    def __init__(self, ctx, cfg):
        if ctx.teacher is None:
            raise ConfigError(
                "sfd --one-step trains a second full network (the fake score) beside the generator and cannot run "
                "on LoRA: pass --trainable full (or attention, cross-attention)"
            )
        top = ctx.schedule.num_train_timesteps
        if cfg.generator_t >= top:
            raise ConfigError(f"sfd.generator_t={cfg.generator_t} must be below the schedule's {top} timesteps")
        self.ctx, self.cfg = ctx, cfg
        # The student is still the pretrained model here, in float32 (the teacher may be half).
        self.fake = copy.deepcopy(ctx.student).requires_grad_(True).train()
        self.params = list(self.fake.parameters())
        lr = cfg.fake_lr or ctx.lr
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    # ----------------------------------------------------------------- the generator
    def generate(self, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """``x_g [B, C, h, w]``: the student's clean-latent estimate from noise ``z`` at ``generator_t``."""
        ctx = self.ctx
        t = torch.full((z.shape[0],), self.cfg.generator_t, dtype=torch.long, device=z.device)
        return ctx.schedule.predict_z0(z, mean_part(ctx, ctx.student_predict(z, t, cond)), t)

    def _noise(self, n: int) -> torch.Tensor:
        ctx = self.ctx
        return ctx.randn(n, latent_channels(ctx), *ctx.latent_hw)

    # ----------------------------------------------------------------- score networks
    def _fake_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The fake score's raw prediction ``[B, C_out, h, w]`` (float32), under the run's autocast."""
        with self.ctx.autocast():
            pred, _ = self.ctx.adapter.predict(self.fake, x_t, t, cond)
        return pred.float()

    def _teacher_z0(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, null: dict) -> torch.Tensor:
        """The frozen model's clean-latent estimate, differentiable in ``x_t`` (its weights stay frozen);
        ``null`` is only called for with ``--teacher-guidance`` other than 1."""
        ctx, scale = self.ctx, self.cfg.teacher_guidance
        if scale == 1.0:
            pred, _ = ctx.teacher_predict(x_t, t, cond, grad=True)
        else:
            b = x_t.shape[0]
            out, _ = ctx.teacher_predict(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_kwargs([null, cond]),
                                         grad=True)
            pred = guided(ctx, out[:b], out[b:], scale)
        return ctx.schedule.predict_z0(x_t, mean_part(ctx, pred), t)

    # ----------------------------------------------------------------- one step
    def fake_step(self, gen_cond: dict, n: int) -> torch.Tensor:
        """Step 1: one AdamW step of the fake score on ``n`` fresh generator samples; returns its loss."""
        ctx, cfg = self.ctx, self.cfg
        with torch.no_grad():
            x_g = self.generate(self._noise(n), gen_cond)
        eps = ctx.randn_like(x_g)
        t = ctx.timesteps(n, cfg.t_low, cfg.t_high)
        pred = self._fake_predict(ctx.schedule.add_noise(x_g, eps, t), t, gen_cond)
        loss = denoising_loss(ctx, pred, x_g, eps, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.world > 1:  # the fake score is not DDP-wrapped: average its gradients by hand
            import torch.distributed as dist

            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= ctx.world
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.detach()

    def generator_loss(self, gen_cond: dict, teacher_cond: dict, null: dict, n: int) -> torch.Tensor:
        """Step 2: SiD's generator loss on ``n`` samples, per sample ``[n]`` (the caller weights and averages)."""
        ctx, cfg = self.ctx, self.cfg
        x_g = self.generate(self._noise(n), gen_cond)
        eps = ctx.randn_like(x_g)
        t = ctx.timesteps(n, cfg.t_low, cfg.t_high)
        x_t = ctx.schedule.add_noise(x_g, eps, t)
        d_real = self._teacher_z0(x_t, t, teacher_cond, null)
        self.fake.requires_grad_(False)  # gradients flow through its input only
        try:
            d_fake = ctx.schedule.predict_z0(x_t, mean_part(ctx, self._fake_predict(x_t, t, gen_cond)), t)
        finally:
            self.fake.requires_grad_(True)
        w = 1.0 / (x_g - d_real).abs().flatten(1).mean(1).detach().clamp_min(1e-6)
        diff = d_real - d_fake
        per = (diff * ((d_real - x_g) - cfg.sid_alpha * diff)).flatten(1).mean(1)
        return per * w

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"fake.{k}": v for k, v in self.fake.state_dict().items()}
        for i, p in enumerate(self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"fake_opt.{i}.{key}"] = torch.as_tensor(value)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        fake = {k[len("fake."):]: v for k, v in state.items() if k.startswith("fake.")}
        if not fake:
            return
        self.fake.load_state_dict(fake)
        for i, p in enumerate(self.params):
            # AdamW keeps its step count on the CPU (unless capturable); the moments live with the weights
            entry = {key.split(".", 2)[2]: (v if key.endswith(".step") else v.to(p.device))
                     for key, v in state.items() if key.startswith(f"fake_opt.{i}.")}
            if entry:
                self.optimizer.state[p] = entry
