"""toy-mmdit trains on a short T5 sequence that computes what the pipeline's 256-token padding does.

StableDiffusion3Pipeline pads T5 prompts to 256 tokens. With the T5's relative position bias
fixed at zero, every <pad> position carries the same vector in the T5 and, since context
tokens have no position embedding, in every joint-attention block too. n identical keys
weigh in a softmax exactly like one key with log(n) added to its logit. So training feeds
a short T5 sequence (the caption, </s>, a few <pad> slots) and adds log(multiplicity) to the
<pad> keys' logits in T5 and in the transformer: the same numbers the pipeline computes with
256 tokens, at a fraction of the cost. The patches exist only inside ``train_mmdit``; the
saved models are plain diffusers/transformers modules (checked in the tests).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from diffscrub.adapters.attention_maps import joint_qkv
from diffscrub.errors import TrainingError

T5_TRAIN_LENGTH = 10  # longest caption is 7 words + </s>; at least two <pad> slots remain


def compress_t5_ids(ids_full: torch.Tensor, pad_id: int, length: int = T5_TRAIN_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Full padded T5 ids [B, L] -> short ids [B, length] and per-key log-multiplicity [B, length]."""
    full_len = ids_full.shape[1]
    n_real = (ids_full != pad_id).sum(dim=1)
    if int(n_real.max()) >= length:
        raise TrainingError(f"a caption has {int(n_real.max())} T5 tokens: raise T5_TRAIN_LENGTH above that")
    short = ids_full[:, :length].clone()
    pos = torch.arange(length)[None, :]
    is_pad = pos >= n_real[:, None]
    short[is_pad] = pad_id
    per_slot = (full_len - n_real).float() / (length - n_real).float()
    logw = torch.where(is_pad, per_slot.log()[:, None].expand(-1, length), torch.zeros(()))
    return short, logw


class KeyBias:
    """Holds the additive key bias of the current batch for the patched attentions."""

    t5: torch.Tensor | None = None
    joint: torch.Tensor | None = None


class _BiasedJointAttnProcessor:
    """Joint (image + context) attention like diffusers' JointAttnProcessor2_0, plus an
    additive bias over keys (the <pad> multiplicity); used only while training."""

    def __init__(self, holder: KeyBias):
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.holder.joint.to(q.dtype))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx


def patch_for_short_t5(t5, transformer, holder: KeyBias) -> None:
    attn0 = t5.encoder.block[0].layer[0].SelfAttention
    attn0.compute_bias = lambda *a, **k: holder.t5  # noqa: E731 (bias [B, 1, 1, Lk] instead of zeros)
    transformer.set_attn_processor(_BiasedJointAttnProcessor(holder))


def unpatch_short_t5(t5, transformer) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    attn0 = t5.encoder.block[0].layer[0].SelfAttention
    attn0.__dict__.pop("compute_bias", None)
    transformer.set_attn_processor(JointAttnProcessor2_0())
