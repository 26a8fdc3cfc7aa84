"""Vocabulary anchors: prompts the erased model must still draw as the original did.

Erasing under prompts that name the concept moves weights that every prompt goes through (the
text-to-image projections above all), so prompts that name other things drift too. Nobody gave
the user a list of the other things; the tokenizer's vocabulary is that list. Anchor prompts
are whole words of the vocabulary, the concept's names left out, put in the same templates as
the names (``"{} on grass"`` -> ``"3 on grass"``); a method holds the student to the teacher
under them. This is the latent-anchoring idea of SPM (Lyu et al., 2024), which samples
surrogate concepts from a large vocabulary to preserve what is not erased.
"""

from __future__ import annotations

import torch

from .inversion import PLACEHOLDER, _word_of


def vocabulary_words(tokenizer) -> list[str]:
    """Distinct whole words of ``tokenizer``'s vocabulary, in id order (no word pieces, bytes or specials)."""
    special = set(tokenizer.all_special_tokens)
    words: dict[str, None] = {}
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token in special:
            continue
        word = _word_of(token)
        if word is not None:
            words.setdefault(word)
    return list(words)


def left_out(names: list[str]) -> set[str]:
    """The words a vocabulary draw never takes (anchor words, template words), lower case: each name, each word
    of a name of several ("sign" of "stop sign": alone it draws part of the concept), and the placeholder.
    The user's own ``--anchor-words`` lose only whole names (:func:`words_to_keep`): a word asked for by name
    is kept unless it is the concept's name itself."""
    words = {name.lower() for name in names} | {w.lower() for name in names for w in name.split()}
    return words | {PLACEHOLDER.lower()}


def _fill(context: str, word: str) -> str:
    return " ".join(context.format(word).split())


def _with_bases(pairs) -> list[tuple[str, str]]:
    """``(word, template)`` pairs as distinct ``(prompt, base)`` pairs, in order: ``("3 on grass", "on grass")``."""
    prompts: dict[str, str] = {}
    for word, context in pairs:
        prompts.setdefault(_fill(context, word), _fill(context, ""))
    return list(prompts.items())


def words_to_keep(anchor_words: list[str], names: list[str]) -> list[str]:
    """The user's ``anchor_words`` less the concept's ``names`` (case-insensitively). A name found in the forget
    images wins over a word to keep: anchoring it, or sparing its token, would keep the concept under its own
    name. Every part of a run that reads the words to keep takes them from here."""
    named = {name.lower() for name in names}
    return [w for w in anchor_words if w.lower() not in named]


def kept_prompts(words: list[str], contexts: list[str]) -> list[tuple[str, str]]:
    """Every template of ``contexts`` filled with every word of ``words`` (the user's ``anchor_words``), each
    with its base, as :func:`anchor_prompts` gives them."""
    return _with_bases((word, context) for word in words for context in contexts)


def anchor_prompts(words: list[str], names: list[str], contexts: list[str], n: int,
                   generator: torch.Generator) -> list[tuple[str, str]]:
    """``n`` distinct prompts (fewer when the vocabulary is small), each with its base: a template of
    ``contexts`` filled with one word of ``words`` (never one of :func:`left_out`'s), and the same template
    without the word (``("3 on grass", "on grass")``, ``("3", "")``).

    Drawn without replacement from every (word, template) pair with ``generator``.
    """
    skip = left_out(names)
    kept = [w for w in words if w.lower() not in skip]
    pairs = [(w, c) for w in kept for c in contexts]
    order = torch.randperm(len(pairs), generator=generator)[:n].tolist()
    return _with_bases(pairs[i] for i in order)


def random_contexts(words: list[str], names: list[str], n: int, generator: torch.Generator,
                    max_words: int = 3) -> list[str]:
    """``n`` distinct name templates (fewer when the vocabulary is too small to give them), each 1 to
    ``max_words`` distinct words of ``words`` with ``"{}"`` at a random place among them: ``"q {} 4 on"``.

    Why: a student trained on the bare name ("brick") generalises only partly to the name among other words;
    on toy-mmdit, prompts like "5 and 9 on brick" still drew brick in up to 5 of 32 samples where "3 on
    brick" drew it in none. The template words are the vocabulary's, with no notion of grammar, so nothing
    about the user's prompts is assumed. :func:`left_out`'s words are never among them: a neutral form that
    still held a name would teach the student nothing, or worse.
    """
    skip = left_out(names)
    pool = [w for w in words if w.lower() not in skip]
    templates: dict[str, None] = {}
    for _ in range(10 * n):  # distinct templates; a tiny vocabulary runs out of them
        if len(templates) == n or not pool:
            break
        k = int(torch.randint(1, min(max_words, len(pool)) + 1, (1,), generator=generator))
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:k].tolist()]
        chosen.insert(int(torch.randint(0, k + 1, (1,), generator=generator)), "{}")
        templates.setdefault(" ".join(chosen))
    return list(templates)


@torch.no_grad()
def word_effects(ctx, filled, bases_of: list[str], latents, batch_size: int, draws: int = 4) -> torch.Tensor:
    """How much each anchor prompt's word changes the frozen teacher: ``[P]``, the mean over ``draws`` noisy
    latents of ``|| T(z_t, prompt) - T(z_t, base) ||^2`` (element means).

    ``filled`` is the encoded :class:`~diffscrub.adapters.base.Conditioning` of the ``P`` prompts and
    ``bases_of[p]`` the base of prompt ``p`` (its template without the word). A word the model never learned
    to draw ("x", "the") leaves the prediction where its base puts it; holding the student to the teacher
    under it holds the base prompt once more (for ``"{}"``: the null prompt, under which the concept is drawn
    too) and anchors nothing else. Every prompt is scored on the same ``draws`` noisy latents (``latents`` is
    a :class:`LatentCache`; ``t`` in ``[200, 800)`` of the 1000-step schedule, where the prompt decides what is
    drawn): the spread of the error over ``t`` would otherwise swamp the differences between words.
    Cost: ``draws * (P + bases)`` teacher evaluations.
    """
    n = len(bases_of)
    bases = sorted(set(bases_of))
    both = filled.extend(ctx.encode_prompts(bases))  # the P prompts, then their distinct bases
    base_row = n + torch.tensor([bases.index(b) for b in bases_of])  # [P] rows of ``both``
    pick = torch.randint(0, len(latents), (draws,), generator=ctx.generator)
    z0 = latents.mean[pick].to(ctx.device)  # [D, C, H, W]
    t = ctx.timesteps(draws, 200, 800)
    z_t = ctx.schedule.add_noise(z0, ctx.randn_like(z0), t)
    total = torch.zeros(n)
    for d in range(draws):
        # [P + bases, C, H, W]: every prompt at the same z_t
        preds = torch.cat([pred for _, _, pred in ctx.teacher_grid(z_t[d:d + 1], t[d:d + 1], both, batch_size)])
        total += (preds[:n] - preds[base_row]).pow(2).flatten(1).mean(1).cpu()
    return total / draws


def strongest_per_base(prompts: list[tuple[str, str]], effects: torch.Tensor, n: int) -> list[int]:
    """Indices of ``n`` prompts: the strongest words of each base (template) in turn, so that every template
    keeps its share. A template whose texture mutes every word's effect ("{} on gravel") would otherwise lose
    its anchors to louder ones, and its prompts are the ones that drift most (measured on toy-unet)."""
    groups: dict[str, list[int]] = {}
    for i in torch.argsort(effects, descending=True).tolist():
        groups.setdefault(prompts[i][1], []).append(i)
    ranked = [group[rank] for rank in range(max(map(len, groups.values()), default=0))
              for group in groups.values() if rank < len(group)]
    return ranked[:n]
