"""The Teacher–Student Scrubber.

Phase 1 fits K prototypes to the frozen teacher's mid-depth features of the forget images
(semantic timestep band, spherical k-means). Phase 2 distils the student: with the soft mask
``M = sigmoid(alpha * (max_k cos(f, p_k) - tau))`` at latent resolution,

    z0_blind = (1 - M) * z0 + M * fill,         z_t_blind = a_t * z0_blind + s_t * eps
    L_f = w(t) || M * (x0(S, z_t) - x0(T, z_t_blind)) ||^2   (inside: the teacher's inpainting)
    L_b = || (1 - M) * (S(z_t) - T(z_t)) ||^2   (outside: unchanged)
    L_r = || S(z_t^r) - T(z_t^r) ||^2           (retain anchor)
    L_v = || S(z_t^v, c_v) - T(z_t^v, c_v) ||^2 (vocabulary anchors, optional)
    L   = lambda_f L_f + lambda_b L_b + lambda_r L_r + lambda_v L_v

(``keep_weight="clean"``: L_b, L_r and L_v as ``w(t) || x0(S, z) - x0(T, z) ||^2``, in L_f's units)

with the same t and eps for ``z_t`` and ``z_t_blind`` (squared norms as element means),
``x0(P, z)`` the clean latent a prediction P at z implies, and ``w(t) = clamp(SNR(t), floor, gamma)``.
``c_v`` is a vocabulary-anchor prompt (``"3 on grass"``: a word of the tokenizer that is not the concept's
name, see :mod:`diffscrub.concept.vocabulary`) and ``z_t^v`` a noisy retain latent (forget latent without
retain images): the prompts users write about other things keep their drawing.

Why not the seed's ``|| M * (S(z_t) - T(z_t_blind)) ||^2``: the two inputs differ inside the mask
by ``a_t * M * (fill - z0)``, so a student that matches the teacher's *raw* prediction at the
other input implies the clean latent ``x0(T, z_t_blind) + M * (z0 - fill)``: the object comes
back additively, in full at small t where the teacher trusts its input. Matching clean
estimates instead removes it (``forget_target="seed"`` keeps the seed's loss for comparison;
README has the measured difference). The upper clip stops small t, where a clean error is
amplified by a/s, from dominating; the floor keeps weight on high t, where the content is decided.

Cost per step, against the seed's three teacher passes and a VAE encode:

* forget latents are VAE-encoded once (cached moments, a fresh posterior sample per step);
* ``mask_mode="cached"`` (default) detects each forget image's mask once, in the semantic band
  where features are meaningful and averaged over draws, so a step needs a single batched
  teacher call on ``[z_t, z_t_blind, z_t^r]``;
* ``mask_mode="online"`` (the seed's per-step detection) takes T(z_t) and the tapped features
  from one pass, then one batched call on ``[z_t_blind, z_t^r]``.
"""

from __future__ import annotations

import torch

from ...adapters.base import concat_kwargs
from ...core.context import LatentCache
from ...core.naming import word_named_indices
from ...concept import blind, concept_mask, fit_prototypes, select_prototypes, subsample, surround_fill
from ...concept.knn import knn_scores, scores_to_mask
from ...concept.name_embeddings import NameEmbeddings
from ...concept.vocabulary import words_to_keep
from ...concept.mask import to_latent
from ...concept.naming import location_error, reference_mask, smooth
from ...errors import ConfigError
from ..base import METHODS, Method
from ..common import mean_part
from .config import TSSConfig


def masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``(weight * (a - b))^2`` over every element (the seed's ``mse(a*M, b*M)``)."""
    return ((a - b) * weight).pow(2).mean()


def clean_mse(schedule, student: torch.Tensor, z_s: torch.Tensor, teacher: torch.Tensor, z_teacher: torch.Tensor,
              t: torch.Tensor, mask, gamma: float, floor: float) -> torch.Tensor:
    """``clamp(SNR(t), floor, gamma) * || mask * (x0(S, z_s) - x0(T, z_teacher)) ||^2`` (element means): the
    error of the clean latents the two predictions ``[B, C', H, W]`` imply, ``mask`` ``[B, 1, H, W]`` or a number.
    Learned-variance models (DiT, PixArt) predict ``C' = 2C`` channels: the variance channels follow the
    teacher's as they are."""
    c = z_s.shape[1]
    x0_student = schedule.predict_z0(z_s, student[:, :c], t)
    x0_target = schedule.predict_z0(z_teacher, teacher[:, :c], t)
    weight = schedule.snr(t).clamp(floor, gamma).reshape(-1, *([1] * (z_s.ndim - 1))).to(z_s.device, z_s.dtype)
    loss = (((x0_student - x0_target) * mask).pow(2) * weight).mean()
    if student.shape[1] > c:
        loss = loss + masked_mse(student[:, c:], teacher[:, c:], mask) * (student.shape[1] - c) / c
    return loss


def forget_loss(schedule, kind: str, student: torch.Tensor, z_t: torch.Tensor, teacher_blind: torch.Tensor,
                z_t_blind: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, gamma: float = 5.0,
                floor: float = 1.0) -> torch.Tensor:
    """The forget term inside ``mask [B, 1, H, W]``.

    ``student``: S(z_t); ``teacher_blind``: T(z_t_blind), both in the model's prediction space
    ``[B, C, H, W]``. ``kind="clean"``: :func:`clean_mse` of S at z_t and T at z_t_blind;
    ``kind="seed"``: ``|| M * (S - T) ||^2`` (element means).
    """
    if kind == "seed":
        return masked_mse(student, teacher_blind, mask)
    return clean_mse(schedule, student, z_t, teacher_blind, z_t_blind, t, mask, gamma, floor)


@METHODS.register("tss")
class TeacherStudentScrubber(Method):
    name = "tss"
    config_class = TSSConfig
    needs = frozenset({"forget"})
    resumable_state = True

    def __init__(self, config: TSSConfig, ctx):
        super().__init__(config, ctx)
        self.prototypes: torch.Tensor | None = None  # [K', D] unit norm: the ones the detector uses
        self.all_prototypes: torch.Tensor | None = None  # [K, D] every k-means centre
        self.selection = None  # PrototypeSelection when contrastive
        self.masks: torch.Tensor | None = None  # [N, 1, H, W] cached masks of the forget images
        # fingerprint "knn": (forget vectors [M, D], their images [M], retain vectors [R, D], their images [R])
        self._knn_banks = None
        self._contrast = None  # latents of null-prompt samples, when there is no retain folder
        self._fill_prior = None  # [N, C]: each contrast image's mean latent, when fill_prior > 0
        self.name_rows: NameEmbeddings | None = None  # the names' learned input embeddings (name_embeddings)
        self._reencoded: torch.Tensor | None = None  # [n] pool indices of the prompts the student re-encodes

    # ------------------------------------------------------------------ phase 1
    def _band_vectors(self, cache, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsampled teacher features of every image of ``cache`` in the semantic band: ``[M, D]``,
        and the index of the image each vector came from, ``[M]``."""
        ctx, cfg = self.ctx, self.config
        n, vectors, images = len(cache), [], []
        for _ in range(cfg.fit_draws):
            for start in range(0, n, self._batch):
                index = torch.arange(start, min(n, start + self._batch))
                z0 = cache.mean[index].to(ctx.device)  # posterior mean, for stable detection
                t = ctx.timesteps(len(index), cfg.t_low, cfg.t_high)
                z_t = ctx.schedule.add_noise(z0, ctx.randn_like(z0), t)
                _, feats = ctx.teacher_predict(z_t, t, ctx.cond.take(ctx.null_index(len(index))), features=True)
                kept = subsample(feats.vectors.float().cpu(), cfg.vectors_per_image, ctx.generator)  # image order
                vectors.append(kept)
                images.append(index.repeat_interleave(kept.shape[0] // len(index)))
                if progress:
                    progress(len(index))
        return torch.cat(vectors), torch.cat(images)

    def _contrast_cache(self):
        """Retain latents, or latents of null-prompt samples the model generates itself (drawn once per run:
        the contrastive selection and the names fingerprint's reference read the same ones)."""
        ctx, cfg = self.ctx, self.config
        if ctx.retain is not None:
            return ctx.retain
        if self._contrast is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
            self._contrast = ctx.generate_latents([""] * cfg.contrast_samples, steps=cfg.contrast_sample_steps,
                                                  seed=seed, batch_size=self._batch)
        return self._contrast

    @torch.no_grad()
    def fit(self, batch_size: int, progress=None) -> torch.Tensor:
        """Fit prototypes to teacher features of the forget images (null prompt); keep the contrastive ones."""
        ctx, cfg = self.ctx, self.config
        self._batch = batch_size
        forget_vectors, forget_images = self._band_vectors(ctx.forget, progress)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        self.all_prototypes = fit_prototypes(forget_vectors.to(ctx.device), cfg.num_prototypes, seed=seed,
                                             backend=cfg.kmeans_backend)
        self.prototypes = self.all_prototypes
        retain_vectors = retain_images = None
        if cfg.contrastive or cfg.fingerprint == "knn":
            retain_vectors, retain_images = self._band_vectors(self._contrast_cache())
        if cfg.contrastive:
            self.selection = select_prototypes(self.all_prototypes, forget_vectors, retain_vectors, cfg.tau,
                                               cfg.contrast_ratio)
            self.prototypes = self.all_prototypes[self.selection.keep]
        if cfg.fingerprint == "knn":  # the banks the masks are scored against (prototypes stay for the report)
            self._knn_banks = (forget_vectors.to(ctx.device), forget_images, retain_vectors.to(ctx.device),
                               retain_images)
        return self.prototypes

    @torch.no_grad()
    def detect(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher prediction and concept mask ``[B, 1, H, W]`` from one teacher pass."""
        pred, feats = self.ctx.teacher_predict(z_t, t, cond, features=True)
        return pred, concept_mask(feats, self.prototypes, self.config.tau, self.config.alpha, z_t.shape[-2:])

    @classmethod
    def check_inputs(cls, config: TSSConfig, *, conditioning: str = "auto", fsdp: bool = False, **_) -> None:
        """Input checks that need no model (the CLI's preflight calls this before anything loads)."""
        if config.fingerprint == "names" and conditioning == "null":
            raise ConfigError("tss.fingerprint='names' scores where the concept's names help the teacher, and "
                              "--conditioning null names nothing: drop --conditioning null, or use --fingerprint knn")
        if config.name_embeddings and conditioning == "null":
            raise ConfigError("tss.name_embeddings learns the embeddings of the concept's names, and --conditioning "
                              "null names nothing: drop --conditioning null, or drop --name-embeddings")
        if config.forget_prompts == "named" and conditioning == "null":
            raise ConfigError("tss.forget_prompts='named' draws the forget term's prompts among those naming the "
                              "concept, and --conditioning null names nothing: drop --conditioning null, or drop "
                              "--forget-prompts")
        if config.name_embeddings and fsdp:
            raise ConfigError("tss.name_embeddings trains the text encoders' rows beside the denoiser, and --fsdp "
                              "shards the denoiser only: drop --fsdp, or drop --name-embeddings")

    def _naming_prompts(self, option: str = "fingerprint='names'", fix: str = "use --fingerprint knn") -> torch.Tensor:
        """Pool indices ``[K]`` of the prompts that name the concept (their neutral form is another prompt)."""
        named = self.ctx.cond.named_indices()
        if not named:
            raise ConfigError(f"tss.{option} needs the concept's names and this run has none (the model has "
                              f"no text encoder, or --conditioning null): {fix}, or pass --names")
        return torch.tensor(named, dtype=torch.long)

    def _forget_prompt_index(self, batch: int) -> torch.Tensor:
        """``[B]`` pool indices of the forget term's prompts: uniform over the pool, or over its named prompts."""
        if self.config.forget_prompts == "all":
            return self.ctx.prompt_index(batch)
        named = self._forget_named()
        return named[self.ctx.randint(0, len(named), batch)]

    def _forget_named(self) -> torch.Tensor:
        return self._naming_prompts("forget_prompts='named'", "drop --forget-prompts")

    @torch.no_grad()
    def _names_scores(self, cache, index: torch.Tensor, draw: int, named: torch.Tensor) -> torch.Tensor:
        """One draw of the names fingerprint for images ``index [B]`` of ``cache``: ``[B, H, W]`` error differences.

        Image ``i`` of draw ``d`` is scored under named prompt ``(d * N + i) mod K``, so the draws of one image
        go round the templates ("7", "7 on grass", ...) and each costs two teacher calls, made as one.
        """
        ctx, cfg = self.ctx, self.config
        z0 = cache.mean[index].to(ctx.device)  # [B, C, H, W] posterior mean, for stable detection
        b = len(index)
        prompt = named[(draw * len(cache) + index) % len(named)]  # [B]
        t = ctx.timesteps(b, cfg.t_low, cfg.t_high)
        eps = ctx.randn_like(z0)
        z_t = ctx.schedule.add_noise(z0, eps, t)
        cond = concat_kwargs([ctx.cond.take(ctx.cond.neutral_index(prompt)), ctx.cond.take(prompt)])
        pred, _ = ctx.teacher_predict(torch.cat([z_t, z_t]), torch.cat([t, t]), cond)
        err = location_error(mean_part(ctx, pred), ctx.schedule.target(z0, eps, t).repeat(2, 1, 1, 1))
        return (err[:b] - err[b:]).cpu()  # [B, H, W]: positive where the name explains the latent

    def _mean_over_draws(self, n: int, score, progress=None) -> torch.Tensor:
        """``score(index [B], draw) -> [B, ...]`` for every one of ``n`` images, averaged over ``mask_draws``:
        ``[N, ...]``. Batches and draws go in the same order for every fingerprint, so the random draws do too."""
        cfg, total = self.config, None
        for draw in range(cfg.mask_draws):
            for start in range(0, n, self._batch):
                index = torch.arange(start, min(n, start + self._batch))
                s = score(index, draw)
                total = torch.zeros(n, *s.shape[1:]) if total is None else total
                total[index] += s
                if progress:
                    progress(len(index))
        return total / cfg.mask_draws

    def _names_field(self, cache, named: torch.Tensor, progress=None) -> torch.Tensor:
        """Names scores of every image of ``cache``, averaged over ``mask_draws`` and box-filtered: ``[N, H, W]``."""
        field = self._mean_over_draws(len(cache), lambda index, draw: self._names_scores(cache, index, draw, named),
                                      progress)
        return smooth(field, self.config.names_smooth)

    def _names_masks(self, progress=None) -> torch.Tensor:
        """``[N, 1, H, W]`` masks of the names fingerprint: the top ``knn_area`` share of the forget images'
        scores, or (``names_z > 0``) the scores above the contrast images' by ``names_z`` robust sigmas."""
        cfg, named = self.config, self._naming_prompts()
        scores = self._names_field(self.ctx.forget, named, progress)
        if cfg.names_z > 0:
            reference = self._names_field(self._contrast_cache(), named)
            return reference_mask(scores, reference, cfg.names_z)[:, None]
        return scores_to_mask(scores, cfg.knn_area)[:, None]  # one threshold over all forget locations

    def _null_draw(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(z_t, t, null conditioning)`` for clean latents ``z0 [B, C, H, W]`` at semantic-band timesteps."""
        ctx, cfg = self.ctx, self.config
        t = ctx.timesteps(z0.shape[0], cfg.t_low, cfg.t_high)
        return ctx.schedule.add_noise(z0, ctx.randn_like(z0), t), t, ctx.cond.take(ctx.null_index(z0.shape[0]))

    @torch.no_grad()
    def _knn_field(self, cache, reference: bool = False, progress=None) -> torch.Tensor:
        """Mean knn score over ``mask_draws`` semantic-band draws of every image of ``cache``: ``[N, Hf, Wf]`` on
        the feature grid.

        ``reference``: ``cache`` holds the contrast images, and each location is scored as a forget location
        would be if it were one: its forget neighbours minus its contrast neighbours, its own image left out
        of the latter, as a forget location's own image is left out of its forget neighbours.
        """
        ctx, cfg = self.ctx, self.config
        forget_bank, forget_images, retain_bank, retain_images = self._knn_banks

        def score(index: torch.Tensor, _draw: int) -> torch.Tensor:
            z_t, t, cond = self._null_draw(cache.mean[index].to(ctx.device))
            _, feats = ctx.teacher_predict(z_t, t, cond, features=True)
            b, locations, dim = feats.vectors.shape
            queries, own = feats.vectors.reshape(-1, dim), index.repeat_interleave(locations)
            if reference:  # knn_scores(own side, other side) = own - other: swap the banks and the sign
                s = -knn_scores(queries, own, retain_bank, retain_images, forget_bank, cfg.knn_k)
            else:
                s = knn_scores(queries, own, forget_bank, forget_images, retain_bank, cfg.knn_k)
            return s.reshape(b, *feats.grid)

        return self._mean_over_draws(len(cache), score, progress)

    @torch.no_grad()
    def cache_masks(self, batch_size: int, progress=None) -> torch.Tensor:
        """One mask per forget image: the mean over ``mask_draws`` semantic-band detections."""
        ctx, cfg = self.ctx, self.config
        self._batch = batch_size
        if cfg.fingerprint == "names":
            self.masks = self._names_masks(progress)
            return self.masks
        if cfg.fingerprint == "knn":
            scores = self._knn_field(ctx.forget, progress=progress)  # [N, Hf, Wf]
            if cfg.knn_z > 0:
                mask = reference_mask(scores, self._knn_field(self._contrast_cache(), reference=True), cfg.knn_z)
            else:  # one threshold over all forget locations: images without the concept may keep little
                mask = scores_to_mask(scores, cfg.knn_area)
            self.masks = to_latent(mask.flatten(1), mask.shape[-2:], ctx.latent_hw)
            return self.masks
        n = len(ctx.forget)
        total = torch.zeros(n, 1, *ctx.latent_hw)
        for _ in range(cfg.mask_draws):
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(n, start + batch_size))
                _, m = self.detect(*self._null_draw(ctx.forget.mean[index].to(ctx.device)))
                total[index] += m.float().cpu()
                if progress:
                    progress(len(index))
        self.masks = total / cfg.mask_draws
        return self.masks

    def prepare(self, progress=None, batch_size: int = 8):
        self.fit(batch_size, progress)
        figures = {"num_prototypes": int(self.all_prototypes.shape[0]), "prototypes_kept": int(self.prototypes.shape[0]),
                   "feature_dim": int(self.prototypes.shape[1])}
        if self.selection is not None:
            figures["prototype_selection"] = self.selection.as_dict()
        if self.config.mask_mode == "cached":
            masks = self.cache_masks(batch_size, progress)
            figures["mask_mean_area"] = float(masks.mean())
        if self.config.fill_prior > 0:
            # [N, C, H, W] -> [N, C]: each contrast image's flat colour, like the surround it is mixed with.
            # A step draws one per forget image, a colour that some image without the concept has; their
            # mean is a colour none has.
            self._fill_prior = self._contrast_cache().mean.float().mean(dim=(2, 3))
        if self.config.blind_fill == "contrast":
            self._contrast_cache()  # drawn now, before training, if no fingerprint needed it
        if self.config.forget_prompts == "named":  # refused here, before training, when there are no names
            self._forget_named()
        if self.config.name_embeddings:
            adapter = self.ctx.adapter
            pairs = adapter.loaded_text_encoder_pairs()
            # The tokens, with how far they moved, go into the record when the run finishes.
            keep = words_to_keep(self.config.anchor_words, self.ctx.names)
            self.name_rows = NameEmbeddings.for_names(adapter.pipe, pairs, self.ctx.names, keep).to(self.ctx.device)
        return figures

    def parameter_groups(self):
        if self.name_rows is None:
            return []
        return [{"params": list(self.name_rows.parameters()), "weight_decay": 0.0,
                 "lr": self.config.name_embedding_lr or self.ctx.lr}]

    def finish(self, pipe):
        if self.name_rows is None:
            return {}
        change = self.name_rows.change(pipe)  # against the tables before they are written
        self.name_rows.write_into(pipe)
        tokens = self.name_rows.tokens(pipe, self.ctx.adapter.loaded_text_encoder_pairs())
        return {"name_embeddings": {"tokens": tokens, "largest_relative_change": change}}

    def _student_pool(self):
        """The student's conditioning pool: the teacher's, except that with name_embeddings the prompts naming
        the concept are encoded again through the learned rows (with gradients to them). The inversion's
        placeholder prompts stay as they are: the pipeline's tokenizer does not hold the placeholder."""
        ctx = self.ctx
        if self.name_rows is None:
            return ctx.cond
        if self._reencoded is None:
            self._reencoded = torch.tensor(word_named_indices(ctx.cond), dtype=torch.long)
        if not len(self._reencoded):
            return ctx.cond
        prompts = [ctx.cond.prompts[i] for i in self._reencoded.tolist()]
        with self.name_rows.active(ctx.adapter.pipe):
            encoded = ctx.adapter.encode_prompts(prompts, ctx.image_hw, grad=True).to(ctx.device)
        return ctx.cond.with_rows(self._reencoded, encoded)

    def prepare_work(self, n_forget: int) -> int:
        """Forget images the progress bar of :meth:`prepare` counts (fingerprint and mask passes)."""
        draws = self.config.fit_draws + (self.config.mask_draws if self.config.mask_mode == "cached" else 0)
        return n_forget * draws

    # ------------------------------------------------------------------ phase 2
    def _keep_cond(self, prompt: torch.Tensor, cond: dict) -> dict:
        """The teacher's conditioning for the keep terms of pool prompts ``prompt [B]`` (taken as ``cond``):
        the same prompts under ``name_target="keep"``, their neutral forms under ``"neutral"``."""
        if self.config.name_target == "keep":
            return cond
        return self.ctx.cond.take(self.ctx.cond.neutral_index(prompt))

    def loss(self, step: int, batch_size: int):
        ctx, cfg = self.ctx, self.config
        index = ctx.forget_sampler.next(batch_size)
        z0 = ctx.forget.sample(index, ctx.generator).to(ctx.device)  # [B, C, H, W]
        b = z0.shape[0]
        prompt = self._forget_prompt_index(b)  # [B] pool indices
        cond = ctx.cond.take(prompt)  # the teacher's; the student's comes from its own pool
        pool = self._student_pool()  # once a step: with name_embeddings it encodes the named prompts
        s_cond = pool.take(prompt)  # the same as cond unless the named prompts were re-encoded
        t = ctx.timesteps(b)
        eps = ctx.randn_like(z0)
        z_t = ctx.schedule.add_noise(z0, eps, t)

        use_retain = ctx.retain is not None and cfg.lambda_r > 0
        if use_retain:
            r_index = ctx.retain_sampler.next(batch_size)
            z0r = ctx.retain.sample(r_index, ctx.generator).to(ctx.device)
            prompt_r = ctx.prompt_index(len(r_index))
            cond_r = ctx.cond.take(prompt_r)
            s_cond_r = pool.take(prompt_r)
            t_r = ctx.timesteps(len(r_index))
            z_tr = ctx.schedule.add_noise(z0r, ctx.randn_like(z0r), t_r)

        anchor = ctx.anchor_index(b) if cfg.lambda_v > 0 else None  # [B] pool indices of anchor prompts
        if anchor is not None:
            source, sampler = (ctx.retain, ctx.retain_sampler) if ctx.retain is not None else (ctx.forget,
                                                                                                ctx.forget_sampler)
            z0v = source.sample(sampler.next(batch_size), ctx.generator).to(ctx.device)
            t_v = ctx.timesteps(z0v.shape[0])
            z_tv = ctx.schedule.add_noise(z0v, ctx.randn_like(z0v), t_v)
            cond_v = ctx.cond.take(anchor)

        # Teacher targets. Inputs are concatenated along the batch so one call serves several targets.
        # Inside the mask the target is the teacher's inpainting under the null prompt, whatever prompt the
        # student sees: a prompt naming the concept must not bring it back through the conditional branch
        # (blind_prompt "keep": under the keep target's prompt instead, which with "neutral" has no name in it).
        # Outside the mask (and on retain latents) "keep" follows the teacher under the student's own prompt;
        # "neutral" under its neutral form (the name taken out), so a prompt naming the concept stops steering.
        cond_null = ctx.cond.take(ctx.null_index(b))
        cond_keep = self._keep_cond(prompt, cond)
        if cfg.mask_mode == "cached":
            mask = self.masks[index].to(ctx.device)  # [B, 1, H, W]
            parts = [(z_t, t, cond_keep)]
        else:
            t_orig, mask = self.detect(z_t, t, cond_keep)
            parts = []
        if cfg.blind_fill == "surround":
            prior = None
            if self._fill_prior is not None:  # [b, C]: a contrast image's colour for each forget image
                prior = self._fill_prior[ctx.randint(0, self._fill_prior.shape[0], b)]
            fill = surround_fill(z0, mask, prior, cfg.fill_prior)
        elif cfg.blind_fill == "contrast":
            # [b, C, H, W]: the same places in a contrast image drawn for each forget image (posterior means:
            # no draw from the generator, so the noise stream is the same as under the other fills)
            source = self._contrast_cache().mean
            fill = source[ctx.randint(0, source.shape[0], b)].to(z0)
        else:
            fill = ctx.randn_like(z0)
        z_t_blind = ctx.schedule.add_noise(blind(z0, mask, fill), eps, t)
        parts.append((z_t_blind, t, cond_null if cfg.blind_prompt == "null" else cond_keep))
        if use_retain:
            parts.append((z_tr, t_r, self._keep_cond(prompt_r, cond_r)))
        if anchor is not None:
            parts.append((z_tv, t_v, cond_v))
        targets, _ = ctx.teacher_predict(
            torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), concat_kwargs([p[2] for p in parts])
        )
        sizes = [p[0].shape[0] for p in parts]
        chunks = list(torch.split(targets, sizes))
        if cfg.mask_mode == "cached":
            t_orig = chunks.pop(0)
        t_blind = chunks.pop(0)

        # Student: forget, retain and anchor inputs in one call too.
        groups = [(z_t, t, s_cond)] + ([(z_tr, t_r, s_cond_r)] if use_retain else []) \
            + ([(z_tv, t_v, cond_v)] if anchor is not None else [])
        student = ctx.student_predict(torch.cat([g[0] for g in groups]), torch.cat([g[1] for g in groups]),
                                      concat_kwargs([g[2] for g in groups]))
        s_parts = list(torch.split(student, [g[0].shape[0] for g in groups]))
        s_forget = s_parts.pop(0)

        loss_f = forget_loss(ctx.schedule, cfg.forget_target, s_forget, z_t, t_blind, z_t_blind, t, mask,
                             cfg.snr_gamma, cfg.snr_floor)
        loss_b = self._keep_loss(s_forget, t_orig, z_t, t, 1.0 - mask)
        total = cfg.lambda_f * loss_f + cfg.lambda_b * loss_b
        terms = {"forget": loss_f.detach(), "background": loss_b.detach()}
        if use_retain:
            loss_r = self._keep_loss(s_parts.pop(0), chunks.pop(0), z_tr, t_r)
            total = total + cfg.lambda_r * loss_r
            terms["retain"] = loss_r.detach()
        if anchor is not None:
            loss_v = self._keep_loss(s_parts.pop(0), chunks.pop(0), z_tv, t_v)
            total = total + cfg.lambda_v * loss_v
            terms["vocab_anchor"] = loss_v.detach()
        terms["mask_area"] = mask.mean().detach()
        return total, terms

    def _keep_loss(self, student: torch.Tensor, teacher: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                   weight=1.0) -> torch.Tensor:
        """A term that holds the student to the teacher at the same input ``z_t`` (background, retain, anchors).

        ``keep_weight="prediction"``: ``|| weight * (S - T) ||^2`` in the model's prediction space.
        ``"clean"``: :func:`clean_mse`, the forget term's own weighting. Why: in eps units the clean-target
        forget term weighs high t, where what is drawn is decided, by ``clamp(SNR, floor, gamma) / SNR`` (about
        200 at the last step of SD's schedule), the prediction-space keep terms by 1, so there the forget term
        outweighs everything that keeps."""
        cfg = self.config
        if cfg.keep_weight == "clean":
            return clean_mse(self.ctx.schedule, student, z_t, teacher, z_t, t, weight, cfg.snr_gamma, cfg.snr_floor)
        return masked_mse(student, teacher, weight)

    # ------------------------------------------------------------------ records
    def artifacts(self):
        out = {}
        if self.prototypes is not None:
            out["prototypes"] = self.prototypes.contiguous()
        if self.all_prototypes is not None:
            out["all_prototypes"] = self.all_prototypes.contiguous()
        if self.selection is not None:
            out["prototype_kept"] = self.selection.keep.float()
            out["prototype_forget_rate"] = self.selection.forget_rate.float()
            out["prototype_retain_rate"] = self.selection.retain_rate.float()
        if self.masks is not None:
            out["forget_masks"] = self.masks.contiguous()
        if self._fill_prior is not None:
            out["fill_prior"] = self._fill_prior.contiguous()
        if self.name_rows is not None:
            out.update(self.name_rows.state())
        return out

    def state_dict(self):
        state = self.artifacts()
        if self.config.blind_fill == "contrast" and self._contrast is not None:
            # null-prompt samples drawn for this run: a resume fills from the same ones (a retain folder is
            # reloaded with the run, so it is not stored)
            state["contrast_mean"] = self._contrast.mean.contiguous()
            state["contrast_std"] = self._contrast.std.contiguous()
        return state

    def load_state_dict(self, state):
        self.prototypes = state.get("prototypes")
        self.all_prototypes = state.get("all_prototypes", self.prototypes)
        self.masks = state.get("forget_masks")
        self._fill_prior = state.get("fill_prior")
        self.name_rows = NameEmbeddings.from_state(state)
        if self.name_rows is not None:
            self.name_rows.to(self.ctx.device)
        if "contrast_mean" in state:
            self._contrast = LatentCache(state["contrast_mean"], state["contrast_std"])
