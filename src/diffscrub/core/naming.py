"""Before Phase 1: what the run calls the concept, and what it holds in place.

Textual inversion names the concept from the forget images (or ``--names`` gives its names), and
the names go into the conditioning pool in every ``--name-contexts`` template; ``--name-samples``
draws images of those prompts to join the forget images; ``--vocab-anchors`` and ``--anchor-words``
add prompts under which the student is held to the teacher. Each step reads and grows the run's
:class:`~diffscrub.core.context.ErasureContext` and returns the figures recorded in ``diffscrub.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters.base import Conditioning
from ..errors import ConfigError
from .progress import Progress

if TYPE_CHECKING:
    from .trainer import Run


def concept_names(conditioning: dict, name_words: int) -> list[str]:
    """The names a run used for the concept, from its conditioning record (what :func:`name_concept`
    returns, as saved in ``diffscrub.json``): the ones given, else the inversion's first ``name_words``."""
    return list(conditioning.get("given_names") or list(conditioning.get("nearest_words") or [])[:name_words])


def word_named_indices(cond: Conditioning) -> list[int]:
    """Pool indices of the prompts that name the concept in words: the inversion's placeholder prompts left
    out, since the pipeline's tokenizer does not hold the placeholder (nothing can draw or re-encode them)."""
    from ..concept.inversion import PLACEHOLDER

    return [i for i in cond.named_indices() if PLACEHOLDER not in cond.prompts[i]]


def _suspects(config, weighed) -> list[str]:
    """With ``--leave-out-candidates``, every word the inversion weighed as a name (kept out of the drawn templates
    and the vocabulary anchors, not only the names it chose); without it, none."""
    return list(weighed) if config.leave_out_candidates else []


def _context_drawer(run: Run):
    """``names -> templates``: the run's ``--random-contexts`` templates, drawn from the first tokenizer's
    vocabulary without ``names`` (a generator seeded from the run's, consumed only when the option is on)."""
    from ..concept.vocabulary import random_contexts, vocabulary_words

    wanted = run.config.random_contexts
    if not wanted:
        return None
    tokenizer = getattr(run.adapter.pipe, run.adapter.loaded_text_encoder_pairs()[0][0])

    def draw(names: list[str], weighed: list[str] = ()) -> list[str]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=run.ctx.generator))
        left_out = [*names, *_suspects(run.config, weighed)]  # random_contexts leaves out a set of them
        return random_contexts(vocabulary_words(tokenizer), left_out, wanted, torch.Generator().manual_seed(seed),
                               max_words=run.config.random_context_words)

    return draw


def name_concept(run: Run, log) -> dict | None:
    """Textual inversion (``conditioning`` auto/inversion): name the concept and grow the conditioning pool
    (with ``--names``, the given names instead of the inversion's)."""
    from ..concept.inversion import invert_concept

    config, ctx = run.config, run.ctx
    if config.conditioning not in ("auto", "inversion"):
        return None
    if config.conditioning == "auto" and not getattr(type(run.method), "inversion_pool", True):
        # Methods whose keep terms run over the pool (sfd) would preserve the concept's own words.
        return None
    if not run.adapter.text_encoder_pairs:
        if config.conditioning == "inversion":
            raise ConfigError(f"conditioning='inversion' needs a text encoder; the {run.adapter.family} model has "
                              "none: use --conditioning null")
        # names are text: a class-conditional model has nowhere to put them, nor anything to rank or place
        for flag, value in (("names", config.names), ("inversion-rerank", config.inversion_rerank),
                            ("random-contexts", config.random_contexts)):
            if value:
                raise ConfigError(f"--{flag} needs a text encoder; the {run.adapter.family} model has none: "
                                  f"drop --{flag}")
        return None
    if config.names:  # the user's names: no inversion, no learned token
        from ..concept.inversion import name_prompts

        names = [" ".join(name.split()) for name in config.names]
        draw = _context_drawer(run)
        contexts = list(config.name_contexts) + (draw(names) if draw else [])
        prompts, neutral = name_prompts(names, len(names), contexts, list(ctx.cond.prompts), placeholder=False)
        ctx.cond = ctx.cond.extend(ctx.encode_prompts(prompts))
        ctx.cond.neutral = neutral
        ctx.names, ctx.contexts = names, contexts
        log(f"names given: {', '.join(names)}")
        return {"given_names": names, **_drawn_contexts(config, contexts, log)}
    bar = Progress(config.inversion_steps, "phase 1: naming the concept", config.quiet)
    try:
        result = invert_concept(ctx, steps=config.inversion_steps, lr=config.inversion_lr,
                                batch_size=config.batch_size, num_words=config.inversion_words,
                                name_words=config.name_words, contexts=tuple(config.name_contexts),
                                pool=tuple(ctx.cond.prompts), rerank=config.inversion_rerank,
                                more_contexts=_context_drawer(run), progress=bar)
    finally:
        bar.close()
    if result is None:
        return None
    ctx.cond = ctx.cond.extend(result.conditioning)
    ctx.cond.neutral = result.neutral
    if result.fit:  # what each word does to the denoising loss (forget less retain), against the null prompt
        shown = [f"{w} ({result.fit[w]:+.2%})" for w in result.nearest]
    else:
        shown = list(result.nearest)
    log(f"your forget folder looks like: {', '.join(shown) or '(no word found)'}")
    record = {"nearest_words": result.nearest, "inversion_loss_first": result.losses[0],
              "inversion_loss_last": result.losses[-1]}
    if result.fit:  # best first (a list: the record's keys are written sorted)
        record["word_fit"] = [[word, change] for word, change in result.fit.items()]
    record.update(_drawn_contexts(config, result.contexts, log))
    ctx.names, ctx.contexts = concept_names(record, config.name_words), result.contexts
    ctx.suspects = _suspects(config, result.weighed)
    if config.leave_out_candidates:
        record["left_out_candidates"] = ctx.suspects
    return record


def _drawn_contexts(config, contexts: list[str], log) -> dict:
    """The record's (and the log's) ``--random-contexts`` templates: those of ``contexts`` after the given ones."""
    drawn = contexts[len(config.name_contexts):]
    if not drawn:
        return {}
    log(f"name contexts drawn from the vocabulary: {', '.join(repr(c) for c in drawn)}")
    return {"random_contexts": drawn}


NAME_SAMPLE_STEPS = 20  # sampler steps for --name-samples (the pipeline's own sampler and guidance)


def add_name_samples(run: Run, log) -> dict | None:
    """Draw ``config.name_samples`` images of the pool's prompts that name the concept (round robin over them)
    with the model as it is before training, and add them to the forget images.

    Why: the forget folder shows the concept among clutter, as it was photographed; a prompt naming the concept
    draws it as the model draws it (alone, centred, in the prompt's setting). The masks, the fingerprint and the
    distillation then also see the concept where the prompts put it. Only word prompts are drawn: the inversion's
    placeholder is not in the pipeline's tokenizer. Returns the record's figures, or ``None``."""
    config, ctx = run.config, run.ctx
    wanted = config.name_samples
    if not wanted:
        return None
    named = [ctx.cond.prompts[i] for i in word_named_indices(ctx.cond)]
    if not named:
        raise ConfigError("--name-samples draws prompts that name the concept, and this run has none (the model "
                          "has no text encoder, or the method keeps no names): drop --name-samples, or pass --names")
    prompts = [named[i % len(named)] for i in range(wanted)]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    bar = Progress(wanted, "phase 1: drawing the named concept", config.quiet)
    try:
        with ctx.adapter.eval_mode(ctx.student):  # the student is still the teacher here
            drawn = ctx.generate_latents(prompts, steps=NAME_SAMPLE_STEPS, seed=seed, batch_size=config.batch_size,
                                         progress=bar)
    finally:
        bar.close()
    ctx.add_forget(drawn)
    log(f"added {wanted} images the model draws of: {', '.join(named)}")
    return {"count": wanted, "prompts": named, "steps": NAME_SAMPLE_STEPS}


def add_vocab_anchors(run: Run, log) -> dict | None:
    """Append vocabulary-anchor prompts to the conditioning pool when the method asks for them: the config's
    ``anchor_words`` in every name template, then ``vocab_anchors`` more: whole words of the first tokenizer,
    the concept's names and the kept words left out, in the name templates, drawn at random; or, when the
    config's ``vocab_candidates`` is larger, of that many such prompts those whose word moves the teacher most,
    each template in turn.
    Returns the record's figures, or ``None`` when none were added."""
    from ..concept.vocabulary import (anchor_prompts, kept_prompts, strongest_per_base, vocabulary_words, word_effects,
                                      words_to_keep)

    config, ctx, method_config = run.config, run.ctx, run.method_config
    wanted = int(getattr(method_config, "vocab_anchors", 0) or 0)
    keep_words = list(getattr(method_config, "anchor_words", None) or [])
    if wanted <= 0 and not keep_words:
        return None
    pairs = run.adapter.loaded_text_encoder_pairs()
    if not pairs:
        log(f"the {run.adapter.family} model has no text encoder: no vocabulary anchors")
        return None
    # the names Phase 1 found or was given; without naming, the concept prompt's words
    names = ctx.names or (config.concept_prompt or "").split()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    kept_words = words_to_keep(keep_words, names)
    dropped = [w for w in keep_words if w not in kept_words]
    if dropped:
        log(f"--anchor-words: {', '.join(dropped)} is also a name found for the concept; it is not kept")
    keep_words = kept_words
    contexts = ctx.contexts or list(config.name_contexts)
    kept = kept_prompts(keep_words, contexts)
    words = vocabulary_words(getattr(run.adapter.pipe, pairs[0][0]))
    left = list(dict.fromkeys([*names, *ctx.suspects]))  # the chosen names, and with the flag every word weighed
    candidates = anchor_prompts(words, left + keep_words, contexts,
                                max(wanted, int(getattr(method_config, "vocab_candidates", wanted))),
                                torch.Generator().manual_seed(seed)) if wanted > 0 else []
    if not candidates and not kept:
        return None
    figures = {"candidates": len(candidates), "left_out": left}
    if kept:
        figures["kept_words"] = keep_words
    with torch.no_grad():  # encoded once: the effects are read under these, and the kept ones are taken from them
        encoded = ctx.encode_prompts([prompt for prompt, _ in kept + candidates])
    order = list(range(len(candidates)))
    if len(candidates) > wanted:  # more drawn than kept: keep the words that move the teacher most
        drawn = Conditioning([prompt for prompt, _ in candidates],
                             encoded.take(torch.arange(len(kept), len(kept) + len(candidates))))
        effects = word_effects(ctx, drawn, [base for _, base in candidates],
                               ctx.retain if ctx.retain is not None else ctx.forget, config.batch_size)
        order = strongest_per_base(candidates, effects, wanted)
        figures.update(effect_kept_min=float(effects[order].min()), effect_median=float(effects.median()))
    rows = list(range(len(kept))) + [len(kept) + i for i in order]  # [kept prompts, then the drawn ones]
    prompts = [prompt for prompt, _ in kept] + [candidates[i][0] for i in order]
    ctx.cond = ctx.cond.with_anchors(Conditioning(prompts, encoded.take(torch.tensor(rows))))
    return {"count": len(prompts), "examples": prompts[:8], **figures}
