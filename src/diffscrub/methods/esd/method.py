"""ESD: erasing a concept by fine-tuning towards negative guidance (Gandikota et al., ICCV 2023).

Each step draws noisy latents ``z_t`` and asks the frozen teacher ``T`` for its unconditional and
concept-conditioned predictions; the student ``S`` (concept-conditioned) is trained towards the
prediction that classifier-free guidance with a *negative* scale would give:

    target = T(z_t, null) - eta * (T(z_t, c) - T(z_t, null))
    L      = || S(z_t, c) - target ||^2                     (element mean)

so that sampling with the concept prompt afterwards moves away from the concept. ``z_t`` comes
from the frozen model itself (``source="generate"``: a few DDIM/Euler steps from pure noise under
the concept prompt with guidance ``generate_guidance``, down to the step's timestep ``t``, as ESD
does), or from the forget images noised at ``t`` (``source="forget"``: no sampling cost).

With learned variance (DiT, PixArt) the guidance acts on the mean channels; the variance channels
of the target are the teacher's concept-conditioned ones, so they stay as they were.

Trainable set: ESD-x, the text-to-image attention (``default_trainable = "cross-attention"``:
UNet/PixArt ``attn2``; in SD3/Flux joint attention, ``to_q``, ``add_k_proj``, ``add_v_proj``). On
DiT, which has no text-to-image attention (the class enters through adaptive norms), pass
``--trainable full`` (ESD-u) or ``attention``. On DiT the concept prompt is a class label name.
"""

from __future__ import annotations

import torch

from ...adapters.base import concat_kwargs
from ..base import METHODS, Method
from ..common import (
    guided,
    noisy_forget,
    repeat_cond,
    require_concept_prompt,
    sample_to,
)
from .config import ESDConfig


def esd_target(ctx, null_pred: torch.Tensor, concept_pred: torch.Tensor, eta: float) -> torch.Tensor:
    """``T(null) - eta (T(c) - T(null))`` on the mean channels; variance channels from ``concept_pred``."""
    return guided(ctx, null_pred, concept_pred, -eta)


@METHODS.register("esd")
class ESD(Method):
    name = "esd"
    config_class = ESDConfig
    needs = frozenset({"concept_prompt"})
    default_trainable = "cross-attention"
    #: whether --conditioning auto should add textual-inversion prompts to the pool
    #: (no: the pool is unused, ESD needs the null and concept prompts only).
    inversion_pool = False

    def __init__(self, config: ESDConfig, ctx):
        super().__init__(config, ctx)
        self.concept = require_concept_prompt(ctx, self.name)
        self._concept_cond = None

    def prepare(self, progress=None, batch_size: int = 8):
        self._concept_cond = self.ctx.encode_prompts([self.concept])
        return {}

    def concept_cond(self, batch: int) -> dict:
        if self._concept_cond is None:
            self._concept_cond = self.ctx.encode_prompts([self.concept])
        return repeat_cond(self._concept_cond, batch)

    @torch.no_grad()
    def noisy_latents(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, t)`` for one step, from the configured source."""
        ctx, cfg = self.ctx, self.config
        if cfg.source == "forget":
            _, _, _, t, z_t = noisy_forget(ctx, batch_size, cfg.t_low, cfg.t_high)
            return z_t, t
        t = ctx.timesteps(batch_size, cfg.t_low, cfg.t_high)
        null = ctx.cond.take(ctx.null_index(batch_size))
        z_t = sample_to(ctx, self.concept_cond(batch_size), t, cfg.generate_steps, guidance=cfg.generate_guidance,
                        null=null)
        return z_t, t

    @torch.no_grad()
    def target(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The negative-guidance target from one batched teacher call on ``[null, concept]``."""
        ctx = self.ctx
        b = z_t.shape[0]
        both = concat_kwargs([ctx.cond.take(ctx.null_index(b)), self.concept_cond(b)])
        out, _ = ctx.teacher_predict(torch.cat([z_t, z_t]), torch.cat([t, t]), both)
        return esd_target(ctx, out[:b], out[b:], self.config.eta)

    def loss(self, step: int, batch_size: int):
        z_t, t = self.noisy_latents(batch_size)
        target = self.target(z_t, t)
        pred = self.ctx.student_predict(z_t, t, self.concept_cond(z_t.shape[0]))
        loss = (pred - target).pow(2).mean()
        return loss, {"esd": loss.detach()}
