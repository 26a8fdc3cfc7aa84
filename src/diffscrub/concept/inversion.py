"""Naming the concept from the images alone: textual inversion on the frozen model.

A placeholder token is added to every tokenizer of the pipeline, and only its rows of the
text encoders' input embeddings are optimised so that the frozen denoiser, conditioned on the
placeholder, denoises the forget latents best (the usual denoising loss against the
schedule's target). The learned embedding's nearest vocabulary tokens (cosine, first text
encoder) say what the forget folder looks like ("7", "seven", ...). The scrubber adds those
words and the placeholder itself to its conditioning pool, so that erasure also holds when a
prompt names the concept; afterwards the tokenizers and text encoders are restored exactly,
so the saved pipeline is the user's own plus the edited denoiser.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .tokens import clean_token, token_embedding_modules

PLACEHOLDER = "<concept>"


@dataclass
class InversionResult:
    nearest: list[str]  # nearest vocabulary words, best first
    prompts: list[str]  # prompts added to the conditioning pool (including the placeholder's conditioning)
    #: for each prompt of the grown pool (the run's pool, then ``prompts``), the index of its neutral form:
    #: the prompt with the concept's name taken out
    neutral: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    conditioning: object = None  # Conditioning of ``prompts``, encoded while the placeholder existed
    #: with re-ranking: every candidate word's score by :func:`rank_by_fit` (negative: the word explains part of
    #: the forget images), best first
    fit: dict[str, float] = field(default_factory=dict)
    #: the name templates the prompts were built from (``contexts``, then those ``more_contexts`` gave)
    contexts: list[str] = field(default_factory=list)
    #: every word considered as a name, best first: the re-ranked candidates, else the nearest words
    weighed: list[str] = field(default_factory=list)


def _word_of(token: str) -> str | None:
    """The word a vocabulary entry stands for, or None for word pieces, bytes and special tokens.

    Whole words are marked by the tokenizer: CLIP's end-of-word ``</w>``, T5's and GPT-2's
    start-of-word ``▁``/``Ġ``.
    """
    if not (token.endswith("</w>") or token.startswith(("▁", "Ġ"))):
        return None
    word = clean_token(token)
    if word and word.isascii() and all(c.isalnum() or c in "-'" for c in word) and any(c.isalnum() for c in word):
        return word
    return None


def nearest_words(embedding_matrix: torch.Tensor, vector: torch.Tensor, tokenizer, k: int,
                  exclude: set[int]) -> list[str]:
    """Top-``k`` distinct words of the vocabulary by cosine similarity to ``vector``."""
    sims = F.normalize(embedding_matrix.float(), dim=-1) @ F.normalize(vector.float(), dim=0)
    for i in exclude:
        sims[i] = -2
    words: list[str] = []
    for idx in torch.argsort(sims, descending=True).tolist():
        word = _word_of(tokenizer.convert_ids_to_tokens(idx))
        if word is not None and word not in words:
            words.append(word)
        if len(words) == k:
            break
    return words


@torch.no_grad()
def _loss_change(ctx, cache, cond, gen: torch.Generator, images: int, batch_size: int) -> torch.Tensor:
    """``[P - 1]``: each of prompts ``1..P-1`` of ``cond``'s change of the teacher's denoising loss on
    ``images`` draws from ``cache`` against prompt 0 (the null prompt), every prompt on the same noisy latents
    (:meth:`~diffscrub.core.context.ErasureContext.teacher_grid`): the mean over draws of each draw's error
    ratio, less one.

    Why a mean of per-draw ratios and not a ratio of summed errors: at one ``t`` the errors of an ε-, v- or
    x0-prediction differ by a factor alone, so a draw's ratio is the same whatever the model predicts, and each
    draw counts alike. Summed ε errors are dominated by the small ``t`` (the noise is hard to tell from the
    image's detail there whatever the prompt), where no word matters: on toy-unet's brick canvases (ε) "brick"
    changed the summed error by +0.1%, the per-draw mean by -0.5% (the best of 17 words, 64
    draws), its eight draws at ``t`` over 880 by -3.5%.
    """
    pick = torch.randint(0, len(cache), (images,), generator=gen)
    mean, std = cache.mean[pick].cpu(), cache.std[pick].cpu()
    z0 = mean + std * torch.randn(mean.shape, generator=gen)  # [N, C, h, w]
    # t stratified over the schedule (one draw in each of ``images`` equal bands): the words differ most at
    # large t, where the prompt decides what is drawn, and a few uniform draws may all miss it
    n_t = ctx.schedule.num_train_timesteps
    t = ((torch.arange(images) + torch.rand(images, generator=gen)) * n_t / images).long().clamp(max=n_t - 1)
    eps = torch.randn(z0.shape, generator=gen)
    z_t, target = ctx.schedule.add_noise(z0, eps, t), ctx.schedule.target(z0, eps, t)
    err = torch.zeros(images, len(cond))  # [N, P]: draw n's squared error under prompt p
    for latents, prompts, pred in ctx.teacher_grid(z_t, t, cond, batch_size):
        err[latents, prompts] = (pred - target[latents].to(pred.device)).pow(2).flatten(1).sum(1).cpu()
    return (err[:, 1:] / err[:, :1].clamp(min=torch.finfo(err.dtype).tiny)).mean(0) - 1


def rank_by_fit(ctx, words: list[str], *, images: int = 64, batch_size: int = 8) -> list[tuple[str, float]]:
    """``words`` ordered by how much better each, alone as the prompt, lets the frozen teacher denoise the forget
    images than the retain images: ``(word, score)`` best first.

    ``score = change(forget) - min(change(retain), 0)``, each the relative change of the denoising loss against
    the null prompt (negative: the word explains part of the images); without retain images, ``change(forget)``.
    The retain term discounts what both sets show (a word that lowers the loss of images without the concept as
    well). On toy-mmdit's brick canvases "brick" lowers the loss by 3.2% (64 draws), none of 16 other words
    by more than 0.1%. The draws come from a generator seeded from the run's, so every process of a
    distributed run ranks alike. Cost: ``(len(words) + 1) * images`` teacher evaluations per set.
    """
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
    cond = ctx.encode_prompts([""] + list(words))
    score = _loss_change(ctx, ctx.forget, cond, gen, images, batch_size)
    if ctx.retain is not None:
        # only what a word explains in the retain images counts against it: a word that hurts them (another
        # background) must not win for that. On toy-mmdit's 7 canvases "brick" raised the forget images' loss
        # by 105% and the retain images' by 262%: unclamped, it would have named the 7 folder.
        score = score - _loss_change(ctx, ctx.retain, cond, gen, images, batch_size).clamp(max=0)
    return [(words[i], float(score[i])) for i in torch.argsort(score).tolist()]


def name_prompts(words: list[str], name_words: int, contexts: list[str],
                 pool: list[str], placeholder: bool = True) -> tuple[list[str], list[int]]:
    """The prompts the inversion adds to ``pool``, and for every prompt of the grown pool the index of its
    neutral form.

    The placeholder and the first ``name_words`` words are the concept's names; each is put in every
    context template (``"{}"`` marks the name, e.g. ``"{} on grass"``), and each filled template's
    neutral form is the template with the name taken out (``"on grass"``; ``""``, the null prompt, for
    ``"{}"``). The remaining words go in every template too, each filled template its own neutral form:
    they are what the forget images share besides the concept (their clutter, the concept's look-alikes),
    and the student learns to keep them as the teacher draws them. ``placeholder=False``: names given by the
    user, no learned token among them.
    """
    names = words[:name_words] + ([PLACEHOLDER] if placeholder else [])
    grown = list(pool)

    def index_of(prompt: str) -> int:
        prompt = " ".join(prompt.split())
        if prompt not in grown:
            grown.append(prompt)
        return grown.index(prompt)

    neutral_of = {}
    for name in names:
        for context in contexts:
            neutral_of[index_of(context.format(name))] = index_of(context.format(""))
    for word in words[name_words:]:
        for context in contexts:
            index_of(context.format(word))
    neutral = [neutral_of.get(i, i) for i in range(len(grown))]
    return grown[len(pool):], neutral


def invert_concept(ctx, *, steps: int = 100, lr: float = 5e-3, batch_size: int = 8, num_words: int = 3,
                   name_words: int = 1, contexts: tuple[str, ...] = ("{}",), pool: tuple[str, ...] = ("",),
                   rerank: int = 0, more_contexts=None, progress=None) -> InversionResult | None:
    """Learn a placeholder token for the forget latents; return the words and pool prompts.

    ``rerank > 0``: the ``rerank`` nearest words in each text encoder's vocabulary are candidates, ordered by
    :func:`rank_by_fit`. The first encoder alone can miss the concept: on toy-mmdit (two CLIPs and a T5) the
    background is carried by the T5's sequence, and the first CLIP's nearest words to brick's placeholder were
    "b, m, l".

    ``more_contexts(names, weighed) -> templates``: name templates to add once the names are known
    (``--random-contexts`` draws them without the names; ``weighed`` is every word considered as a name, best
    first: the re-ranked candidates, else the nearest words).

    Returns ``None`` for families without a text encoder (DiT). ``ctx`` is the run's
    :class:`~diffscrub.core.context.ErasureContext`; the teacher is used, nothing trains but the
    placeholder rows.
    """
    adapter = ctx.adapter
    pipe = adapter.pipe
    pairs = adapter.loaded_text_encoder_pairs()
    if not pairs:
        return None
    saved_tokenizers = {t: copy.deepcopy(getattr(pipe, t)) for t, _ in pairs}
    sizes, rows, params, base_ids, hooks = {}, {}, [], {}, []
    try:
        # 1. Add the placeholder everywhere, initialised at the mean embedding (no prior word).
        for tok_name, enc_name in pairs:
            tokenizer, encoder = getattr(pipe, tok_name), getattr(pipe, enc_name)
            emb = encoder.get_input_embeddings()
            sizes[enc_name] = emb.weight.shape[0]
            base_ids[enc_name] = set(tokenizer.all_special_ids)
            tokenizer.add_tokens([PLACEHOLDER])
            new_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
            if new_id >= emb.weight.shape[0]:
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            # The learned row lives outside the weight table: a forward hook on the embedding module
            # substitutes it wherever the placeholder id occurs, so the user's table is never written.
            row = encoder.get_input_embeddings().weight[: sizes[enc_name]].detach().float().mean(0).clone()
            row.requires_grad_(True)
            rows[enc_name] = (new_id, row)
            params.append(row)

            def hook(module, inputs, output, new_id=new_id, row=row):
                mask = (inputs[0] == new_id).unsqueeze(-1).to(output.dtype)  # [B, L, 1]
                return output * (1 - mask) + mask * row.to(output.dtype)

            hooks.extend(m.register_forward_hook(hook) for m in token_embedding_modules(encoder))
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        # 2. Optimise the placeholder rows against the frozen denoiser's denoising loss.
        losses = []
        for _ in range(steps):
            index = ctx.forget_sampler.next(batch_size)
            z0 = ctx.forget.sample(index, ctx.generator).to(ctx.device)
            t = ctx.timesteps(z0.shape[0])
            eps = ctx.randn_like(z0)
            z_t = ctx.schedule.add_noise(z0, eps, t)
            cond = adapter.encode_prompts([PLACEHOLDER], ctx.image_hw, grad=True).to(ctx.device)
            kwargs = cond.take(torch.zeros(z0.shape[0], dtype=torch.long))
            with ctx._teacher_module() as model, adapter.eval_mode(model):
                pred = adapter.call(model, z_t.to(ctx.dtype), t, kwargs).float()
            mean, _ = adapter.split_variance(pred, z0.shape[1])
            loss = F.mse_loss(mean, ctx.schedule.target(z0, eps, t))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(1)

        # 3. Words nearest to the learned embedding: in the first text encoder's vocabulary, or with re-ranking
        #    in each one's, ordered by fit.
        def nearest_in(tok_name, enc_name, k):
            matrix = getattr(pipe, enc_name).get_input_embeddings().weight[: sizes[enc_name]].detach()
            return nearest_words(matrix, rows[enc_name][1].detach(), getattr(pipe, tok_name), k, base_ids[enc_name])

        fit = {}
        if rerank:
            candidates = list(dict.fromkeys(w for tok_name, enc_name in pairs
                                            for w in nearest_in(tok_name, enc_name, rerank)))
            fit = dict(rank_by_fit(ctx, candidates, batch_size=batch_size))
            words = list(fit)[:num_words]
        else:
            words = nearest_in(*pairs[0], num_words)
        weighed = list(fit) or list(words)
        contexts = list(contexts) + (list(more_contexts(words[:name_words], weighed)) if more_contexts else [])
        prompts, neutral = name_prompts(words, name_words, contexts, list(pool))
        with torch.no_grad():
            cond = adapter.encode_prompts(prompts, ctx.image_hw).to(ctx.device)
        return InversionResult(nearest=words, prompts=prompts, losses=losses, conditioning=cond, neutral=neutral,
                               fit=fit, contexts=contexts, weighed=weighed)
    finally:
        # 4. Restore the user's tokenizers and embedding tables exactly.
        for h in hooks:
            h.remove()
        for tok_name, enc_name in pairs:
            setattr(pipe, tok_name, saved_tokenizers[tok_name])
            pipe.register_modules(**{tok_name: saved_tokenizers[tok_name]})
            encoder = getattr(pipe, enc_name)
            if enc_name in sizes and encoder.get_input_embeddings().weight.shape[0] != sizes[enc_name]:
                encoder.resize_token_embeddings(sizes[enc_name], mean_resizing=False)
