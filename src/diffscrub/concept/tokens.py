"""What the concept modules need to know about tokenizers and text encoders' embedding tables."""

from __future__ import annotations

from torch import nn


def clean_token(text: str) -> str:
    """A vocabulary entry as the text it writes: without CLIP's end-of-word ``</w>`` or the start-of-word
    marks of sentencepiece (``▁``) and byte-level BPE (``Ġ``); ``""`` for a bare mark."""
    return text.replace("</w>", "").replace("\u2581", "").replace("\u0120", "").strip()


def token_embedding_modules(encoder: nn.Module) -> list[nn.Module]:
    """Every embedding module of ``encoder`` that reads its input-embedding table. A forward hook must sit on
    the one the forward pass calls: T5's ``get_input_embeddings()`` is ``shared``, while its encoder calls
    ``encoder.embed_tokens``, a second module tied to the same weight."""
    table = encoder.get_input_embeddings().weight
    return [m for m in encoder.modules() if isinstance(m, nn.Embedding) and m.weight is table]
