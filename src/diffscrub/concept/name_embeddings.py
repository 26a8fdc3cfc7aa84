"""Learned input embeddings of the concept's names, in every text encoder of the pipeline.

Why: the denoiser's keys and values see a name only through the text encoder's output, and in a causal
encoder (CLIP) every word after the name carries it too. A student trained on "7 on grass" learns the
keys and values of "on" and "grass" after a 7, not those of "and 0 on flat" after one, so a prompt
that puts the name in a context the run never trained on still draws the concept. The name's own row
in the encoder's input table is upstream of every context: learning it reaches all of them at once,
and no prompt without the name changes at all.

The rows live outside the weight tables while training (a forward hook on each embedding module puts
them in, as textual inversion does), so the frozen teacher's conditioning, computed before, is the
original model's; :meth:`NameEmbeddings.write_into` copies them into the tables of the pipeline that is
saved. Tokens that the kept words (``--anchor-words``) also use, and special tokens, are not learned.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError
from .tokens import clean_token, token_embedding_modules


class NameEmbeddings(nn.Module):
    """Trainable copies of the input-embedding rows of the names' tokens, one table per text encoder.

    For encoder ``e``: ``ids_e [n_e]`` (long buffer) and ``rows_e [n_e, D_e]`` (fp32 parameter, initialised
    at the encoder's own rows).
    """

    def __init__(self, encoders: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.encoders = list(encoders)
        for name, (ids, rows) in encoders.items():
            self.register_buffer(f"ids_{name}", ids.long().cpu())
            setattr(self, f"rows_{name}", nn.Parameter(rows.detach().float().cpu().clone()))

    @classmethod
    def for_names(cls, pipe, pairs: list[tuple[str, str]], names: list[str], keep: list[str]) -> "NameEmbeddings":
        """The rows of every token of ``names`` in each (tokenizer, encoder) of ``pairs``, less the tokens of
        ``keep`` and the special ones. One line (ConfigError) when no token is left to learn."""
        if not pairs:
            raise ConfigError("tss.name_embeddings learns the text encoder's rows of the concept's names, and this "
                              "model has no text encoder: drop --name-embeddings")
        if not names:
            raise ConfigError("tss.name_embeddings needs the concept's names and this run has none "
                              "(--conditioning null): drop --name-embeddings, or pass --names")
        encoders = {}
        for tok_name, enc_name in pairs:
            tokenizer, encoder = getattr(pipe, tok_name), getattr(pipe, enc_name)
            special = set(tokenizer.all_special_ids)

            def ids_of(words):
                # A token that writes no character by itself (sentencepiece's word-start mark) begins many
                # words: learning it would change them all.
                ids = {i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids} - special
                return {i for i in ids if clean_token(tokenizer.convert_ids_to_tokens(i))}

            ids = sorted(ids_of(names) - ids_of(keep))
            if ids:
                table = encoder.get_input_embeddings().weight
                encoders[enc_name] = (torch.tensor(ids), table[torch.tensor(ids, device=table.device)])
        if not encoders:
            raise ConfigError(f"tss.name_embeddings: every token of the names ({', '.join(names)}) is also a word to "
                              "keep (--anchor-words) or a special token, so there is nothing to learn: drop "
                              "--name-embeddings, or the shared word from --anchor-words")
        return cls(encoders)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "NameEmbeddings | None":
        """Rebuild from :meth:`state` (a checkpoint or another process's phase 1); ``None`` if it holds none."""
        names = sorted(k[len("name_ids."):] for k in state if k.startswith("name_ids."))
        if not names:
            return None
        return cls({n: (state[f"name_ids.{n}"], state[f"name_rows.{n}"]) for n in names})

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.encoders:
            out[f"name_ids.{name}"] = getattr(self, f"ids_{name}")
            out[f"name_rows.{name}"] = getattr(self, f"rows_{name}").detach().cpu().contiguous()
        return out

    def tokens(self, pipe, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
        """The learned tokens by encoder, each as the text it stands for (for the record)."""
        out = {}
        for tok_name, enc_name in pairs:
            if enc_name in self.encoders:
                tokenizer = getattr(pipe, tok_name)
                ids = getattr(self, f"ids_{enc_name}").tolist()
                out[enc_name] = [clean_token(token) for token in tokenizer.convert_ids_to_tokens(ids)]
        return out

    @contextlib.contextmanager
    def active(self, pipe):
        """While inside, each encoder's embedding module returns the learned rows for the names' tokens."""
        hooks = []
        try:
            for name in self.encoders:
                ids, rows = getattr(self, f"ids_{name}"), getattr(self, f"rows_{name}")

                def hook(module, inputs, output, ids=ids, rows=rows):
                    # output [B, L, D]; where[b, l] is the position of input_ids[b, l] in ids, or -1
                    input_ids = inputs[0]
                    match = input_ids.unsqueeze(-1) == ids.to(input_ids.device)  # [B, L, n]
                    hit = match.any(-1, keepdim=True).to(output.dtype)  # [B, L, 1]
                    learned = match.to(rows.dtype) @ rows.to(output.device)  # [B, L, D] (zero where no hit)
                    return output * (1 - hit) + learned.to(output.dtype)

                hooks.extend(m.register_forward_hook(hook) for m in token_embedding_modules(getattr(pipe, name)))
            yield
        finally:
            for h in hooks:
                h.remove()

    def change(self, pipe) -> float:
        """Largest relative change of a learned row against the pipeline's own row (for the record)."""
        worst = 0.0
        for name in self.encoders:
            ids, rows = getattr(self, f"ids_{name}"), getattr(self, f"rows_{name}").detach()
            table = getattr(pipe, name).get_input_embeddings().weight.detach()
            before = table[ids.to(table.device)].float().cpu()
            worst = max(worst, float(((rows - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)).max()))
        return worst

    @torch.no_grad()
    def write_into(self, pipe) -> None:
        """Copy the learned rows into the encoders' tables (the pipeline about to be saved)."""
        for name in self.encoders:
            table = getattr(pipe, name).get_input_embeddings().weight
            ids = getattr(self, f"ids_{name}").to(table.device)
            table[ids] = getattr(self, f"rows_{name}").detach().to(table.device, table.dtype)
