"""Attention steering (seed 001): train the text-to-image attention so that image tokens stop
attending to the concept's tokens, with a reconstruction term that keeps the model drawing.

Each step noises a batch of forget latents (``z_t``, uniform ``t``) and runs the student under the
concept prompt ``c`` while capturing, in every text-to-image attention block ``l``, the
probabilities ``A_l [B, heads, N_img, K]`` that image queries give the ``K`` token positions of
the concept (the concept prompt's non-special tokens; see
:func:`~diffscrub.adapters.attention_maps.concept_token_positions`). With ``A_lh`` one head's map
flattened over (queries, concept tokens), and per sample:

    resteer   L_attn = || concat_l A_l ||_2                        (seed Eq. 4)
    distract  L_attn = mean_l sum_h || A_lh - 1/n_l ||_2            (Eq. 5)
    random    L_attn = mean_l sum_h || A_lh - R_lh ||_2             (Eq. 6)

averaged over the batch. ``1/n_l`` is the probability every key would get if the query attended
uniformly over the ``n_l`` keys of its softmax (the text tokens for cross-attention; text and
image tokens for joint attention). ``R_lh`` is a random attention pattern drawn once per block from
the run's generator (a softmax of Gaussian logits over the ``n_l`` keys, restricted to the concept's
columns) and kept fixed, so the loss has a fixed target. Block terms are averaged (the seed sums)
so that ``lambda_attn`` does not depend on the model's depth.

The total is ``lambda_recon * L_recon + lambda_attn * L_attn`` (seed Eq. 7), with

    recon="denoise"   L_recon = || S(z_t, c) - target(z0, eps, t) ||^2          (the seed's choice)
    recon="distill"   L_recon = || S(z_t, c) - T(z_t, c) ||^2                   (frozen teacher)

computed from the same student pass; with ``--retain`` the retain latents (under the pool
prompts) join that pass and the reconstruction term. The attention loss sees the forget part only.

For joint attention (SD3, Flux double blocks) ``A_l`` is the text-to-image block of the joint
attention map: image-query rows and concept-token columns of one softmax over image and text
keys together. Image tokens can therefore also shift attention to other image tokens rather than
to other words. Flux single-stream blocks are not steered.

Trainable set: text-to-image attention only (``default_trainable = "cross-attention"``). With
``skip_outer`` the first and last of these blocks are left out of the loss and their parameters
are frozen (the seed's "S" variant). DiT has no text and is refused. Gradient checkpointing is
refused: the recomputation in the backward pass would run the default processors.
"""

from __future__ import annotations

import torch

from ...adapters.attention_maps import (
    AttentionRecorder,
    capture_text_attention,
    concept_token_positions,
    text_attention_modules,
)
from ...adapters.base import concat_kwargs
from ...errors import ConfigError
from ..base import METHODS, Method
from ..common import denoising_loss, noisy_forget, repeat_cond, require_concept_prompt
from .config import AttentionConfig


def resteer_loss(maps: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 4 per sample, batch mean: ``||concat_l A_l||_2``; maps ``[B, H, Q, K]`` each."""
    sq = sum(m.float().pow(2).flatten(1).sum(1) for m in maps)
    return sq.sqrt().mean()


def distance_loss(maps: list[torch.Tensor], refs: list[torch.Tensor | float]) -> torch.Tensor:
    """Eq. 5/6: per block, the sum over heads of ``||A_h - R_h||_2``; mean over blocks and samples.

    ``refs[l]`` is a float (uniform value) or a tensor broadcastable to ``maps[l]``.
    """
    terms = []
    for m, r in zip(maps, refs):
        diff = m.float() - (r if isinstance(r, float) else r.to(m.device, torch.float32))
        terms.append(diff.flatten(2).norm(dim=-1).sum(dim=1))  # [B]
    return torch.stack(terms).mean()


@METHODS.register("attention")
class AttentionSteering(Method):
    name = "attention"
    compilable = False  # the attention maps are read by processors inside the student's forward
    config_class = AttentionConfig
    needs = frozenset({"forget", "concept_prompt"})
    default_trainable = "cross-attention"
    #: whether --conditioning auto should add textual-inversion prompts to the pool
    #: (no: the pool only conditions the retain reconstruction).
    inversion_pool = False

    def __init__(self, config: AttentionConfig, ctx):
        super().__init__(config, ctx)
        if not ctx.adapter.has_text_encoder:
            raise ConfigError(
                f"method 'attention' steers text-to-image attention, and the {ctx.adapter.family} denoiser is "
                "class-conditional with no text: use --method esd, sfd, vdu or tss"
            )
        self.concept = require_concept_prompt(ctx, self.name)
        if getattr(ctx.student, "is_gradient_checkpointing", False):
            raise ConfigError("method 'attention' does not work with --gradient-checkpointing: leave it off")
        names = [name for name, _, _ in text_attention_modules(ctx.student)]
        if not names:
            raise ConfigError(f"method 'attention': the {ctx.adapter.family} denoiser has no text-to-image attention")
        if config.skip_outer:
            if len(names) < 3:
                raise ConfigError(
                    f"attention.skip_outer needs at least 3 text-attention blocks, the denoiser has {len(names)}"
                )
            self._freeze([names[0], names[-1]])
            names = names[1:-1]
        self.block_names = names
        self.positions: torch.Tensor | None = None
        self._concept_cond = None
        self._random: dict[str, torch.Tensor] = {}

    def _freeze(self, module_names: list[str]) -> None:
        """Stop training the parameters of the outer blocks (AdamW skips parameters without gradients)."""
        prefixes = tuple(f"{n}." for n in module_names)
        for name, p in self.ctx.student.named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(False)

    def prepare(self, progress=None, batch_size: int = 8):
        ctx = self.ctx
        self._concept_cond = ctx.encode_prompts([self.concept])
        text = self._concept_cond.kwargs["encoder_hidden_states"]
        self.positions = concept_token_positions(ctx.adapter, self.concept, text.shape[1]).to(ctx.device)
        return {"concept_tokens": int(self.positions.numel()), "steered_blocks": len(self.block_names)}

    def _random_ref(self, name: str, like: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Fixed random attention pattern ``[H, Q, K]`` for block ``name`` (drawn on first use)."""
        if name not in self._random:
            _, h, q, k = like.shape
            logits = torch.randn((h, q, n_keys), generator=self.ctx.generator)
            self._random[name] = logits.softmax(-1)[..., :k].to(like.device)
        return self._random[name]

    def attention_loss(self, records, b: int) -> torch.Tensor:
        maps = [(r.probs if r.columns is not None else r.probs.index_select(-1, self.positions))[:b] for r in records]
        kind = self.config.attention_loss
        if kind == "resteer":
            return resteer_loss(maps)
        if kind == "distract":
            refs = [1.0 / r.n_keys for r in records]
        else:
            refs = [self._random_ref(r.name, m, r.n_keys) for r, m in zip(records, maps)]
        return distance_loss(maps, refs)

    def artifacts(self):
        return {} if self.positions is None else {"concept_token_positions": self.positions.cpu()}

    def loss(self, step: int, batch_size: int):
        ctx, cfg = self.ctx, self.config
        if self.positions is None:
            self.prepare()
        _, z0, eps, t, z_t = noisy_forget(ctx, batch_size, cfg.t_low, cfg.t_high)
        b = z0.shape[0]
        parts = [(z0, eps, t, z_t, repeat_cond(self._concept_cond, b))]
        if ctx.retain is not None and cfg.lambda_recon > 0:
            r_index = ctx.retain_sampler.next(batch_size)
            z0r = ctx.retain.sample(r_index, ctx.generator).to(ctx.device)
            eps_r = ctx.randn_like(z0r)
            t_r = ctx.timesteps(z0r.shape[0], cfg.t_low, cfg.t_high)
            parts.append((z0r, eps_r, t_r, ctx.schedule.add_noise(z0r, eps_r, t_r),
                          ctx.cond.take(ctx.prompt_index(z0r.shape[0]))))
        z0s, epss, ts, zs = (torch.cat([p[i] for p in parts]) for i in range(4))
        conds = concat_kwargs([p[4] for p in parts])

        recorder = AttentionRecorder(columns=self.positions)  # keeps only the concept's columns per block
        with capture_text_attention(ctx.student, self.block_names, recorder) as rec:
            pred = ctx.student_predict(zs, ts, conds)
        if not rec.records:
            raise RuntimeError("attention: no text-to-image attention map was recorded")
        l_attn = self.attention_loss(rec.records, b)
        rec.clear()

        total = cfg.lambda_attn * l_attn
        terms = {"attention": l_attn.detach()}
        if cfg.lambda_recon > 0:
            if cfg.recon == "denoise":
                l_recon = denoising_loss(ctx, pred, z0s, epss, ts)
            else:
                target, _ = ctx.teacher_predict(zs, ts, conds)
                l_recon = (pred - target).pow(2).mean()
            total = total + cfg.lambda_recon * l_recon
            terms["recon"] = l_recon.detach()
        return total, terms
