"""Small tokenizers built entirely on the local machine.

The toy pipelines used by the test suite (and the toy models that ship with the
package) need a CLIP-style and a T5-style tokenizer.  The real ones are
downloaded from the Hugging Face hub, which is not reachable here and must not
be required by anyone who installs diffscrub.  So both tokenizers are written
from scratch in this module: a byte-level BPE for CLIP and a Unigram model for
T5, each with a vocabulary of a few hundred entries.  The vocabularies hold
the words the toy data sets use (digits, number words, texture names) as
whole tokens, and single characters as a fallback so that any text can be
tokenized without error.

Both functions return ordinary ``transformers`` tokenizer objects that save
with ``save_pretrained`` and load back with ``from_pretrained`` (and therefore
as components of a saved ``diffusers`` pipeline folder) without network access.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "CLIP_BOS",
    "CLIP_EOS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
]

#: Words that always get a single token of their own in both tokenizers.
DEFAULT_WORDS: tuple[str, ...] = (
    *[str(i) for i in range(10)],
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "and",
    "on",
    "a",
    "an",
    "the",
    "of",
    "photo",
    "image",
    "digit",
    "number",
    "flat",
    "brick",
    "grass",
    "gravel",
    "texture",
    "background",
)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
_EOW = "</w>"  # CLIP's end-of-word marker, glued to the last symbol of a word


def _byte_alphabet() -> dict[int, str]:
    """Map each byte value to the printable character byte-level BPE uses for it.

    Bytes that are already visible, non-space characters map to themselves;
    every other byte is assigned, in increasing byte order, a character from
    U+0100 upwards.  This is the convention GPT-2 and CLIP use, so that the
    ``ByteLevel`` pre-tokenizer of the ``tokenizers`` library produces exactly
    these characters.
    """
    visible = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(0xA1, 0xAC + 1))
        + list(range(0xAE, 0xFF + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unique_words(words: list[str] | None) -> list[str]:
    seen: dict[str, None] = {}
    for w in (*DEFAULT_WORDS, *(words or [])):
        w = w.strip().lower()
        if w and not any(ch.isspace() for ch in w):
            seen.setdefault(w, None)
    return list(seen)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Run BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = None
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    # Every byte as a word-internal symbol, so any text maps onto the vocabulary.
    for b in range(256):
        add(alphabet[b])
    # Word-final forms for the visible ASCII characters (all 256 would double
    # the vocabulary; other word-final bytes become the unknown token).
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        add(alphabet[ord(ch)] + _EOW)

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        encoded = [alphabet[b] for b in word.encode("utf-8")]
        encoded[-1] += _EOW
        for sym in encoded:
            add(sym)
        # Segment with the merges so far, then glue the pieces left to right.
        # New merges rank after all existing ones, so words already handled
        # keep their single-token segmentation.
        pieces = _apply_merges(encoded, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                add(pair[0] + pair[1])
            pieces = _apply_merges(pieces, ranks)
    add(CLIP_BOS)
    add(CLIP_EOS)
    return vocab, merges


def build_clip_tokenizer(words: list[str] | None = None, max_length: int = 16) -> CLIPTokenizer:
    """Build a small CLIP byte-level BPE tokenizer without any download.

    The vocabulary is written as ``vocab.json`` and ``merges.txt`` into a
    temporary folder and loaded with :class:`transformers.CLIPTokenizer`, the
    same way a real CLIP tokenizer is stored.  It contains all 256 byte-level
    symbols, word-final (``</w>``) forms of the visible ASCII characters, the
    whole words of :data:`DEFAULT_WORDS` plus ``words`` (lower-cased; each ends
    up as one token, provided CLIP's pre-tokenizer keeps it in one piece, i.e.
    it is all letters or a single digit), the merges that build them, and the
    special tokens
    ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.  The end
    token doubles as the padding and unknown token, as in CLIP.  Unknown words
    are split into characters.

    Args:
        words: extra whole words to put in the vocabulary.
        max_length: becomes ``model_max_length``; the text encoder that goes
            with the tokenizer needs at least this many position embeddings.
    """
    vocab, merges = _clip_vocab_and_merges(_unique_words(words))
    with tempfile.TemporaryDirectory(prefix="diffscrub-clip-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2 - built locally by diffscrub"] + [f"{a} {b}" for a, b in merges]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(
            str(folder),
            model_max_length=max_length,
            bos_token=CLIP_BOS,
            eos_token=CLIP_EOS,
            unk_token=CLIP_EOS,
            pad_token=CLIP_EOS,
        )
    # The temporary folder is gone: forget it so nothing later points at it
    # (the tokenizer itself lives in memory and saves as tokenizer.json).
    tokenizer.name_or_path = ""
    for key in ("vocab_file", "merges_file", "name_or_path", "is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    for attr in ("vocab_file", "merges_file"):
        if hasattr(tokenizer, attr):
            setattr(tokenizer, attr, None)
    return tokenizer


def _t5_vocab(words: list[str]) -> list[tuple[str, float]]:
    """Unigram pieces with log-probabilities: whole words score far above characters."""
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -3.0}
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for ch in chars:
        pieces.setdefault(ch, -8.0)
        pieces.setdefault("\u2581" + ch, -8.5)
    for word in words:
        for ch in word:
            pieces.setdefault(ch, -8.0)
        pieces["\u2581" + word] = -2.0
        pieces.setdefault("\u2581" + word.capitalize(), -2.5)
    return list(pieces.items())


def build_t5_tokenizer(words: list[str] | None = None, max_length: int = 16) -> T5Tokenizer:
    """Build a small T5-style Unigram tokenizer without any download.

    The real T5 tokenizer is a SentencePiece model fetched from the hub; this
    one is a :class:`tokenizers` Unigram model with T5's layout (``<pad>`` = 0,
    ``</s>`` = 1, ``<unk>`` = 2, whitespace split and the ``▁`` word-start
    marker, ``</s>`` appended to every sequence) wrapped in
    :class:`transformers.T5Tokenizer` (in transformers 5 that is the fast,
    ``tokenizers``-backed class; ``T5TokenizerFast`` is an alias).  It has no
    ``<extra_id_*>`` sentinels, which text-encoder-only use does not need.
    Whole words of :data:`DEFAULT_WORDS` plus ``words`` are single tokens;
    anything else falls back to single characters, and characters outside
    printable ASCII become ``<unk>``.

    Args:
        words: extra whole words to put in the vocabulary.
        max_length: becomes ``model_max_length``.
    """
    tokenizer = T5Tokenizer(vocab=_t5_vocab(_unique_words(words)), extra_ids=0, model_max_length=max_length)
    return tokenizer
