"""Score Forgetting Distillation (seed 003, Chen, Zhang and Zhou), at the score level and data-free.

SFD aligns the model's conditional score for the concept to erase with the frozen model's score
for a safe *anchor* concept, while a score-distillation term keeps every other conditioning as it
was, all on samples the diffusion model generates itself (no real images). Each step:

1. Draw timesteps ``t_f, t_k`` and generate noisy latents with the frozen teacher ``T`` (a few
   DDIM/Euler steps from pure noise, :func:`~diffscrub.methods.common.sample_to`): ``z_f`` under
   the concept prompt ``c`` down to ``t_f`` and ``z_k`` under pool prompts ``p`` (index 0 = null;
   ``--prompts`` with ``--conditioning prompts`` add more) down to ``t_k``, in one batched run.
2. Forgetting term (score-based unlearning): ``L_f = ||S(z_f, c) - T(z_f, a)||^2``, with ``a`` the
   anchor prompt (``--anchor-prompt``, ``""`` = null).
3. Score-distillation regulariser: ``L_k = ||S(z_k, p) - T(z_k, p)||^2``.
4. ``L = lambda_forget L_f + lambda_keep L_k`` (element means; all output channels, so learned
   variance follows the teacher's).

That is the default (score level): the samples come from the frozen teacher's few-step sampler and
the result is an erased multi-step diffusion model. ``--one-step`` runs the paper's full form
instead: the model is distilled into a one-step generator whose own samples feed the score terms,
trained in alternation with a fake score network (:mod:`.generator`); the same split of each batch
applies (the concept's samples scored under the anchor, the pool's under their own prompts), and
the output samples in one call (the run record's ``sampling``).
"""

from __future__ import annotations

from ...adapters.base import concat_kwargs
from ..base import METHODS, Method
from ..common import repeat_cond, require_concept_prompt, sample_to
from .config import SFDConfig
from .generator import OneStepDistiller


@METHODS.register("sfd")
class ScoreForgettingDistillation(Method):
    name = "sfd"
    config_class = SFDConfig
    needs = frozenset({"concept_prompt"})
    default_trainable = "full"
    #: whether --conditioning auto should add textual-inversion prompts to the pool
    #: (no: the keep term preserves the pool, and concept words there would fight the forgetting).
    inversion_pool = False

    def __init__(self, config: SFDConfig, ctx):
        super().__init__(config, ctx)
        self.concept = require_concept_prompt(ctx, self.name)
        self.anchor = ctx.anchor_prompt or ""
        self._prompts = None  # Conditioning of [concept, anchor]
        self.distiller = OneStepDistiller(ctx, config) if config.one_step else None

    def prepare(self, progress=None, batch_size: int = 8):
        self._prompts = self.ctx.encode_prompts([self.concept, self.anchor])
        return {"anchor_prompt": self.anchor}

    def loss(self, step: int, batch_size: int):
        ctx, cfg = self.ctx, self.config
        if self._prompts is None:
            self.prepare()
        b = batch_size
        concept, anchor = repeat_cond(self._prompts, b, 0), repeat_cond(self._prompts, b, 1)
        pool = ctx.cond.take(ctx.prompt_index(b))
        gen_cond = concat_kwargs([concept, pool])
        null = ctx.cond.take(ctx.null_index(2 * b))
        if self.distiller is not None:
            return self._one_step_loss(b, gen_cond, concat_kwargs([anchor, pool]), null)
        t = ctx.timesteps(2 * b, cfg.t_low, cfg.t_high)
        z = sample_to(ctx, gen_cond, t, cfg.sample_steps, guidance=cfg.sample_guidance, null=null)

        # Teacher: the anchor's prediction on the concept's samples, the pool prompt's on its own.
        target, _ = ctx.teacher_predict(z, t, concat_kwargs([anchor, pool]))
        pred = ctx.student_predict(z, t, gen_cond)
        l_f = (pred[:b] - target[:b]).pow(2).mean()
        l_k = (pred[b:] - target[b:]).pow(2).mean()
        total = cfg.lambda_forget * l_f + cfg.lambda_keep * l_k
        return total, {"forget": l_f.detach(), "keep": l_k.detach()}

    def _one_step_loss(self, b: int, gen_cond: dict, teacher_cond: dict, null: dict):
        """``--one-step``: the fake score's step, then the generator's loss (rows ``:b`` the concept's)."""
        cfg = self.config
        l_fake = self.distiller.fake_step(gen_cond, 2 * b)
        per = self.distiller.generator_loss(gen_cond, teacher_cond, null, 2 * b)
        l_f, l_k = per[:b].mean(), per[b:].mean()
        total = cfg.lambda_forget * l_f + cfg.lambda_keep * l_k
        return total, {"forget": l_f.detach(), "keep": l_k.detach(), "fake": l_fake}

    def sampling(self) -> dict | None:
        if self.distiller is None:
            return None
        return {"one_step_timestep": self.config.generator_t}

    def state_dict(self):
        return self.distiller.state_dict() if self.distiller is not None else {}

    def load_state_dict(self, state):
        if self.distiller is not None:
            self.distiller.load_state_dict(state)
