"""Capturing text-to-image attention probabilities, with gradients, from any supported denoiser.

:func:`capture_text_attention` swaps, for the duration of a ``with`` block, the processors of the
attention modules through which text reaches the image tokens for *capturing* processors, and
puts the original processors back on exit (also when the block raises). A capturing processor
returns exactly the hidden states of the default one (same projections, norms, rotary
embeddings, attention call and output layers) and records ``softmax(Q K^T / sqrt(d))`` for the
image-query rows and text-key columns, optionally only at given text positions (``columns``).
By default the recorded slice comes from a separate softmax of the image-query rows over all keys,
checkpointed (recomputed in the backward pass), so no full map is kept per block; with
``AttentionRecorder(explicit=True)`` the output itself is computed as ``probs @ V`` from the full
explicit softmax, which is kept in ``record.full`` (used by the tests to check both).

Three kinds of module are handled:

* ``cross``: classic cross-attention (``Attention`` with ``is_cross_attention``: UNet ``attn2``,
  PixArt ``attn2``). Queries are image tokens, keys are text tokens: the recorded map is the whole
  attention map, ``[B, heads, N_img, N_txt]``.
* ``joint``: SD3/SD3.5 joint attention (``JointAttnProcessor2_0``): one softmax over the joint
  sequence ``[image tokens, text tokens]``. The recorded map is the text-to-image block of the
  joint map: image-query rows and text-key columns, ``probs[:, :, :N_img, N_img:]``. Its rows sum
  to the share of attention image tokens give to the text (< 1), not to one.
* ``flux``: Flux double-stream blocks (``FluxAttention`` with text projections), joint sequence
  ``[text tokens, image tokens]`` with rotary embeddings applied to queries and keys before the
  softmax, as the default processor does; recorded ``probs[:, :, N_txt:, :N_txt]``. Flux
  single-stream blocks mix both streams in one sequence without knowing the text length, and are
  not captured.

:func:`concept_token_positions` finds where a prompt's own (non-special) tokens sit in the text
sequence that the family's adapter builds, so that a method can pick the concept's columns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

KINDS = ("cross", "joint", "flux")


@dataclass
class AttentionRecord:
    """One captured text-to-image attention map.

    ``probs``: ``[B, heads, N_img, N_txt]`` (or ``[..., K]`` when the recorder selects ``columns``),
    the probabilities image queries give text keys, sliced out of a softmax over ``n_keys`` keys
    (``N_txt`` for cross-attention, ``N_img + N_txt`` for joint attention). Carries gradients.
    """

    name: str
    kind: str
    probs: torch.Tensor
    n_keys: int
    #: text positions kept in ``probs`` (``None``: every text token).
    columns: torch.Tensor | None = None
    #: in ``explicit`` mode, the whole softmax ``[B, heads, S_q, S_k]``; ``full[:, :, rows, cols]`` holds
    #: every text column of ``probs``.
    full: torch.Tensor | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))


@dataclass
class AttentionRecorder:
    """Where capturing processors put their maps, in call order.

    Attributes:
        enabled: record at all (off: the processors only reproduce the default computation).
        columns: text positions to keep (e.g. the concept's tokens), applied inside the capture so
            that only ``[B, heads, N_img, K]`` is kept for the backward pass.
        explicit: compute the attention output as ``probs @ V`` from the explicit softmax and keep
            the whole map in ``record.full`` (for verification; memory grows with the square of the
            sequence). Off (the default), the output comes from the very attention call the default
            processor makes, and the recorded slice from a separate, checkpointed softmax of the
            image-query rows, recomputed in the backward pass: joint attention over long sequences
            (SD3, Flux) never keeps a full map per block.
    """

    records: list[AttentionRecord] = field(default_factory=list)
    enabled: bool = True
    columns: torch.Tensor | None = None
    explicit: bool = False

    def clear(self) -> None:
        self.records.clear()


# ----------------------------------------------------------------------------- finding modules
def _module_kind(module: nn.Module) -> str | None:
    """``cross``, ``joint``, ``flux`` or ``None`` (not a text-to-image attention module)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    if isinstance(module, Attention):
        if getattr(module, "add_k_proj", None) is not None:
            return "joint"
        if getattr(module, "is_cross_attention", False):
            return "cross"
        return None
    if isinstance(module, AttentionModuleMixin) and getattr(module, "add_k_proj", None) is not None:
        if type(module).__name__ == "FluxAttention":
            return "flux"
        raise ConfigError(
            f"attention capture: {type(module).__name__} is a joint-attention module diffscrub cannot capture yet "
            "(supported: UNet/PixArt cross-attention, SD3 joint attention, Flux double blocks)"
        )
    return None


def text_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every text-to-image attention module, in registration order."""
    out = []
    for name, module in model.named_modules():
        kind = _module_kind(module)
        if kind is not None:
            out.append((name, module, kind))
    return out


def _check_processor(name: str, module: nn.Module, kind: str) -> None:
    """Refuse modules whose current processor computes something else than the default math."""
    from diffusers.models.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        JointAttnProcessor2_0,
    )

    proc = module.processor
    if kind == "cross":
        ok = isinstance(proc, (AttnProcessor, AttnProcessor2_0)) and not getattr(module, "fused_projections", False)
    elif kind == "joint":
        ok = isinstance(proc, JointAttnProcessor2_0) and not getattr(module, "fused_projections", False)
    else:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        ok = isinstance(proc, FluxAttnProcessor) and not getattr(module, "fused_projections", False)
    if not ok:
        raise ConfigError(
            f"attention capture: module {name!r} uses {type(proc).__name__}"
            f"{' with fused projections' if getattr(module, 'fused_projections', False) else ''}; "
            "only the default processors can be captured: restore them (e.g. unfuse_qkv_projections())"
        )


# ----------------------------------------------------------------------------- attention math
def _scores(query, key, scale: float, mask=None):
    """``q k^T * scale + mask`` for ``[B, H, S, D]`` tensors, in float32."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return scores


def _slice_probs(query_rows, key, scale, mask, cols: slice, columns):
    """Softmax over every key of the given query rows, then the text columns (and ``columns`` of them)."""
    probs = _scores(query_rows, key, scale, mask).softmax(dim=-1)[..., cols]
    if columns is not None:
        probs = probs.index_select(-1, columns.to(probs.device))
    return probs.to(query_rows.dtype)


def _mask_rows(mask, rows: slice):
    if mask is None or mask.ndim < 4 or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


class _Capture:
    """Shared recording logic: ``attend`` returns the attention output ``[B, H, S, D]`` and records."""

    def __init__(self, recorder: AttentionRecorder, name: str, kind: str, original):
        self.recorder, self.name, self.kind, self.original = recorder, name, kind, original

    def attend(self, query, key, value, scale, mask, rows: slice, cols: slice, default_fn):
        """``query/key/value``: ``[B, H, S, D]``; ``default_fn()`` is the default processor's own call."""
        rec = self.recorder
        if rec.explicit:
            probs = _scores(query, key, scale, mask).softmax(dim=-1).to(query.dtype)
            out = torch.matmul(probs, value)
            if rec.enabled:
                part = probs[:, :, rows, cols]
                if rec.columns is not None:
                    part = part.index_select(-1, rec.columns.to(part.device))
                rec.records.append(AttentionRecord(self.name, self.kind, part, probs.shape[-1], rec.columns, probs,
                                                   rows, cols))
            return out
        out = default_fn()
        if rec.enabled:
            q_rows, m_rows = query[:, :, rows], _mask_rows(mask, rows)
            if torch.is_grad_enabled() and (q_rows.requires_grad or key.requires_grad):
                from torch.utils.checkpoint import checkpoint

                part = checkpoint(_slice_probs, q_rows, key, scale, m_rows, cols, rec.columns, use_reentrant=False)
            else:
                part = _slice_probs(q_rows, key, scale, m_rows, cols, rec.columns)
            rec.records.append(AttentionRecord(self.name, self.kind, part, key.shape[2], rec.columns, None, rows, cols))
        return out


class _CrossCapture(_Capture):
    """Same computation as ``AttnProcessor2_0`` / ``AttnProcessor``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        import torch.nn.functional as F
        from diffusers.models.attention_processor import AttnProcessor2_0

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (hidden_states if not is_cross else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # AttnProcessor2_0 leaves the scale to SDPA (1/sqrt(d)); AttnProcessor uses attn.scale.
        sdpa = isinstance(self.original, AttnProcessor2_0)
        scale = head_dim ** -0.5 if sdpa else attn.scale

        def default():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False, scale=None if sdpa else attn.scale)

        if is_cross:
            out = self.attend(query, key, value, scale, attention_mask, slice(None), slice(None), default)
        else:
            out = default()
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Queries, keys and values of a joint-attention block (SD3's ``JointAttnProcessor2_0``), each
    [B, heads, N_img (+ N_ctx), head_dim]: the image tokens' projections, then, with a context, the
    context's own (``add_*_proj``), each with its block's q/k norms."""
    b = hidden_states.shape[0]

    def heads(x):
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is None:
        return q, k, v
    cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
    cv = heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    return torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)


class _JointCapture(_Capture):
    """Same computation as ``JointAttnProcessor2_0`` (SD3): joint sequence ``[image, text]``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        batch_size, n_img = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states)
        head_dim = query.shape[-1]

        def default():
            return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        if encoder_hidden_states is not None:
            out = self.attend(query, key, value, head_dim ** -0.5, None, slice(None, n_img), slice(n_img, None),
                              default)
        else:
            out = default()
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class _FluxCapture(_Capture):
    """Same computation as ``FluxAttnProcessor`` (double blocks): joint sequence ``[text, image]``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        d = attn.head_dim
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, d)))  # [B, S, H, D]
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, d)))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, d))
        n_txt = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            n_txt = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, d))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def default():  # [B, S, H, D], as the default processor calls it
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                         backend=getattr(self.original, "_attention_backend", None),
                                         parallel_config=getattr(self.original, "_parallel_config", None))

        if n_txt:
            mask = attention_mask
            if mask is not None and mask.ndim == 2:  # [B, S_k] key mask
                mask = mask[:, None, None, :]
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, S, D]
            out = self.attend(q, k, v, d ** -0.5, mask, slice(n_txt, None), slice(None, n_txt),
                              lambda: default().transpose(1, 2)).transpose(1, 2)
        else:
            out = default()
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_txt, hidden_states.shape[1] - n_txt], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def capturing_processor(recorder: AttentionRecorder, name: str, module: nn.Module, kind: str):
    """The capturing processor that replaces ``module``'s current one."""
    cls = {"cross": _CrossCapture, "joint": _JointCapture, "flux": _FluxCapture}[kind]
    return cls(recorder, name, kind, module.processor)


@contextlib.contextmanager
def capture_text_attention(model: nn.Module, names: list[str] | None = None, recorder: AttentionRecorder | None = None):
    """Record text-to-image attention maps of ``model`` inside the block.

    Args:
        model: the denoiser (a peft-wrapped one works too: its attention modules keep their processors).
        names: module names to capture (default: every text-to-image attention module).
        recorder: where maps go (a fresh one by default).

    Yields the :class:`AttentionRecorder`; its ``records`` fill up during forward calls.
    """
    recorder = recorder if recorder is not None else AttentionRecorder()
    modules = text_attention_modules(model)
    if names is not None:
        wanted = set(names)
        modules = [m for m in modules if m[0] in wanted]
    if not modules:
        raise ConfigError(
            f"attention capture: {type(model).__name__} has no text-to-image attention modules"
            + (" among the requested names" if names is not None else "")
        )
    for name, module, kind in modules:
        _check_processor(name, module, kind)
    saved = [(module, module.processor) for _, module, _ in modules]
    try:
        for name, module, kind in modules:
            module.set_processor(capturing_processor(recorder, name, module, kind))
        yield recorder
    finally:
        for module, proc in saved:
            module.set_processor(proc)


# ----------------------------------------------------------------------------- concept tokens
def _text_segments(adapter) -> list[tuple[list, int]]:
    """How a family lays out its text sequence: ``[(tokenizers, length), ...]`` concatenated along it.

    Tokenizers listed together feed the same positions (SDXL's two CLIP encoders are concatenated
    along features; SD3's two CLIP encoders likewise, before the T5 tokens are appended).
    """
    pipe, family = adapter.pipe, adapter.family

    def tok(name):
        return getattr(pipe, name, None)

    def clip_len(t):
        # CLIP prompts are padded to the tokenizer's length; T5 ones to the pipeline's (adapter.text_length)
        return int(getattr(t, "model_max_length", 77)) if t is not None else 77

    if family in ("sd", "sdxl"):
        toks = [t for t in (tok("tokenizer"), tok("tokenizer_2")) if t is not None]
        return [(toks, clip_len(toks[0]))]
    if family == "pixart":
        return [([tok("tokenizer")], adapter.text_length())]
    if family == "sd3":
        clip = [t for t in (tok("tokenizer"), tok("tokenizer_2")) if t is not None]
        t5 = tok("tokenizer_3")
        # Without text_encoder_3 the pipeline appends zeros, which carry no token of the prompt.
        t5_toks = [t5] if t5 is not None and getattr(pipe, "text_encoder_3", None) is not None else []
        return [(clip, clip_len(clip[0] if clip else None)), (t5_toks, adapter.text_length())]
    if family == "flux":
        return [([tok("tokenizer_2")], adapter.text_length())]
    raise ConfigError(f"the {family} family has no text tokens to steer attention away from")


def concept_token_positions(adapter, prompt: str, text_len: int | None = None) -> torch.Tensor:
    """Positions ``[K]`` (long) of ``prompt``'s non-special tokens in the family's text sequence.

    ``text_len`` (the conditioning's sequence length) is checked against the layout when given.
    """
    positions: set[int] = set()
    offset = 0
    for toks, length in _text_segments(adapter):
        for tokenizer in toks:
            ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
            special = set(tokenizer.all_special_ids)
            positions |= {offset + i for i, t in enumerate(ids[:length]) if t not in special}
        offset += length
    if text_len is not None and offset != text_len:
        raise RuntimeError(
            f"{adapter.family}: expected a text sequence of {offset} tokens from the tokenizers, the conditioning "
            f"has {text_len}"
        )
    if not positions:
        raise ConfigError(f"concept prompt {prompt!r} has no tokens of its own: pass a non-empty --concept-prompt")
    return torch.tensor(sorted(positions), dtype=torch.long)
