"""The interface every erasure method implements, and the method registry."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..core.context import ErasureContext
from ..registry import Registry

#: inputs a method may declare it needs; the CLI checks them before any model loads.
INPUTS = {
    "forget": "--forget DIR (images of the concept)",
    "retain": "--retain DIR (images to keep)",
    "concept_prompt": "--concept-prompt TEXT (the concept's name)",
    "anchor_prompt": "--anchor-prompt TEXT (what to draw instead)",
}


class Method:
    """An erasure objective. The shared loop calls :meth:`prepare` once, then :meth:`loss` each step.

    Subclasses set ``name``, ``config_class`` (a dataclass validated in ``__post_init__``) and
    ``needs`` (keys of :data:`INPUTS`), and document their formula and source in the docstring.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    needs: ClassVar[frozenset[str]] = frozenset({"forget"})
    #: parameters trained when the user does not pass --trainable (full, attention, cross-attention, lora).
    default_trainable: ClassVar[str] = "full"
    #: whether :meth:`state_dict` holds all of Phase 1's results, so a resumed run can skip :meth:`prepare`
    #: (otherwise prepare runs again on resume, before the checkpoint's RNG states are restored).
    resumable_state: ClassVar[bool] = False
    #: whether --conditioning auto may add the textual-inversion words to the pool for this method.
    inversion_pool: ClassVar[bool] = True
    #: False when the method reads values from inside the student's forward (hooks, attention maps),
    #: which a torch.compile'd graph does not run: --compile is then refused.
    compilable: ClassVar[bool] = True

    def __init__(self, config, ctx: ErasureContext):
        self.config = config
        self.ctx = ctx

    def prepare(self, progress=None, batch_size: int = 8) -> dict[str, Any]:
        """Work done once before training (e.g. fitting prototypes); returns figures for the run record.

        ``progress(n)`` advances the Phase 1 bar by ``n`` units out of :meth:`prepare_work`.
        """
        return {}

    def prepare_work(self, n_forget: int) -> int:
        """How many units :meth:`prepare` reports to the progress bar."""
        return 0

    def loss(self, step: int, batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss for one step and its named terms (detached scalars)."""
        raise NotImplementedError

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Tensors saved beside the output (e.g. prototypes), for evaluation and reports."""
        return {}

    def sampling(self) -> dict[str, Any] | None:
        """How the output must be sampled when not by the pipeline's own sampler, saved in the run record
        (``{"one_step_timestep": t}``: one denoiser call on pure noise at ``t``); ``None``: as usual."""
        return None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups the method trains beside the student's parameters (outside the denoiser, such as a
        text encoder's rows), as ``torch.optim`` param-group dicts; available after :meth:`prepare` (or
        :meth:`load_state_dict`). Their values belong in :meth:`state_dict` so that a resumed run has them."""
        return []

    def finish(self, pipe) -> dict[str, Any]:
        """Write what the method trained outside the denoiser into ``pipe`` before it is saved; returns figures
        for the run record (merged into ``diffscrub.json``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


METHODS: Registry[type[Method]] = Registry("method", "--method")


def list_methods() -> list[str]:
    return METHODS.names()
