"""The contract between the model-agnostic core and one denoiser family.

The core (prototype fitting, masks, losses, the training loop) sees latents as
``[B, C, H, W]`` tensors, timesteps in training units ``[0, T)``, a conditioning
dict it never looks inside, and tapped features as ``[B, L, D]`` image-token vectors
on an ``(Hf, Wf)`` grid. Everything else (argument names, micro-conditioning, latent
packing, learned-variance channels, which block to tap and which stream of its
output holds the image tokens) belongs to an adapter subclass.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..schedules import NoiseSchedule, schedule_from_scheduler


def _map_tensors(tree: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nested dict; other leaves (None, ints) pass through."""
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    return tree


@dataclass
class Conditioning:
    """Frozen conditioning for a pool of ``P`` prompts.

    ``kwargs`` holds denoiser keyword arguments whose tensors all have leading dim ``P``
    (nested dicts such as ``added_cond_kwargs`` are allowed). It is computed once from
    the pipeline's frozen text encoders and indexed per step, so no text encoder runs
    inside the training loop.
    """

    prompts: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: for each prompt, the pool index of its neutral form (the prompt with the concept's name taken
    #: out; itself for a prompt that names nothing). ``None``: every prompt is its own neutral form.
    neutral: list[int] | None = None
    #: prompts ``[0, pool_size)`` are the pool a method's keep and forget terms draw from; the rest are
    #: vocabulary anchors (:meth:`with_anchors`). ``None``: every prompt is in the pool.
    pool_size: int | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def pool_len(self) -> int:
        return len(self.prompts) if self.pool_size is None else self.pool_size

    @property
    def anchor_prompts(self) -> list[str]:
        return self.prompts[self.pool_len:]

    def named_indices(self) -> list[int]:
        """Pool indices of the prompts that name the concept: those whose neutral form is another prompt."""
        if self.neutral is None:
            return []
        return [i for i in range(self.pool_len) if self.neutral[i] != i]

    def neutral_index(self, index: torch.Tensor) -> torch.Tensor:
        """Pool indices of the neutral forms of prompts ``index [B]``."""
        if self.neutral is None:
            return index
        return torch.as_tensor(self.neutral, dtype=torch.long)[index.cpu()].to(index.device)

    def take(self, index: torch.Tensor) -> dict[str, Any]:
        """Denoiser kwargs for a batch: prompt ``index[b]`` for sample ``b``; index ``[B]`` long."""
        return _map_tensors(self.kwargs, lambda x: x.index_select(0, index.to(x.device)))

    def with_rows(self, index: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """This pool with prompts ``index [n]`` taken from ``other`` (``n`` prompts, in that order; gradients
        flow into them): the student's pool when part of it is re-encoded every step."""
        def put(x, y):
            return x.index_copy(0, index.to(x.device), y.to(x.dtype))

        def merge(a, b):
            if isinstance(a, dict):
                return {k: merge(a[k], b[k]) for k in a}
            return put(a, b) if isinstance(a, torch.Tensor) else a

        return Conditioning(self.prompts, merge(self.kwargs, other.kwargs), self.neutral, self.pool_size)

    def extend(self, other: "Conditioning") -> "Conditioning":
        """The pool of both, ``self``'s prompts first."""
        if self.pool_size is not None:
            raise ValueError("extend the pool before adding vocabulary anchors: anchors come last")
        ours = self.neutral or list(range(len(self)))
        theirs = [len(self) + i for i in (other.neutral or range(len(other)))]
        neutral = None if self.neutral is None and other.neutral is None else ours + theirs
        return Conditioning(self.prompts + other.prompts, concat_kwargs([self.kwargs, other.kwargs]), neutral)

    def with_anchors(self, anchors: "Conditioning") -> "Conditioning":
        """This pool followed by vocabulary-anchor prompts, which the pool's draws never return."""
        grown = self.extend(Conditioning(anchors.prompts, anchors.kwargs))
        grown.pool_size = len(self)
        return grown

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(x):
            return x.to(device=device, dtype=dtype if x.is_floating_point() and dtype else None)

        return Conditioning(self.prompts, _map_tensors(self.kwargs, move), self.neutral, self.pool_size)


def concat_kwargs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-batch conditioning dicts along the batch dim (for one batched call)."""
    first = parts[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = concat_kwargs([p[key] for p in parts])
        elif isinstance(value, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts], dim=0)
        else:
            out[key] = value
    return out


@dataclass
class Features:
    """Tapped mid-depth features: ``vectors [B, L, D]`` on grid ``(Hf, Wf)`` with ``L == Hf * Wf``."""

    vectors: torch.Tensor
    grid: tuple[int, int]


class DenoiserAdapter:
    """One denoiser family. Subclasses set the class attributes and override the hooks below.

    Args:
        pipe: a loaded diffusers pipeline of this family. The adapter keeps references to its
            VAE, scheduler and text encoders (frozen) and to its denoiser.
    """

    #: registry name, e.g. ``"sd"``.
    family: ClassVar[str] = ""
    #: human-readable families and pipelines, for the README table and error messages.
    description: ClassVar[str] = ""
    #: prefixes of pipeline class names this adapter handles, most specific adapters registered first.
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ()
    #: denoiser class names this adapter handles (fallback when the pipeline class is custom).
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    #: attribute of the pipeline holding the denoiser.
    denoiser_attr: ClassVar[str] = "transformer"
    #: module-name suffixes that LoRA wraps.
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: whether prompts mean anything to this family (DiT is class-conditional).
    has_text_encoder: ClassVar[bool] = True

    def __init__(self, pipe):
        self.pipe = pipe
        # Context for whole-pipeline sampling; under mixed precision the frozen parts are half and
        # the student fp32, so the core sets this to its autocast.
        self.autocast = contextlib.nullcontext
        if getattr(pipe, self.denoiser_attr, None) is None:
            raise InputError(
                f"pipeline {type(pipe).__name__} has no '{self.denoiser_attr}' for the {self.family} adapter: "
                "pass --family with the right family, or a pipeline of this family"
            )

    # ----------------------------------------------------------------- matching
    @classmethod
    def matches(cls, pipe) -> bool:
        name = type(pipe).__name__
        if any(name.startswith(p) for p in cls.pipeline_prefixes):
            return True
        denoiser = getattr(pipe, cls.denoiser_attr, None)
        return denoiser is not None and type(denoiser).__name__ in cls.denoiser_classes

    # ----------------------------------------------------------------- parts
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    def frozen_modules(self) -> list[nn.Module]:
        """Every module other than the denoiser: VAE and text encoders, frozen during erasure."""
        out = []
        for name, module in self.pipe.components.items():
            if isinstance(module, nn.Module) and name != self.denoiser_attr:
                out.append(module)
        return out

    def schedule(self) -> NoiseSchedule:
        return schedule_from_scheduler(self.pipe.scheduler)

    # ----------------------------------------------------------------- latents
    @property
    def latent_scale_shift(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = cfg.get("shift_factor", None) or 0.0
        return float(cfg.get("scaling_factor", 1.0)), float(shift)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior ``(mean, std)`` in model latent space; images ``[B, 3, H, W]`` in [-1, 1].

        Caching the moments (not one sample) lets each step draw a fresh posterior sample
        without running the encoder again.
        """
        scale, shift = self.latent_scale_shift
        vae = self.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Model latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` in [-1, 1]."""
        scale, shift = self.latent_scale_shift
        vae = self.vae
        return vae.decode((z0 / scale + shift).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)

    # ----------------------------------------------------------------- conditioning
    #: T5 sequence length of the family's diffusers pipeline, for a pipeline class whose ``__call__`` has no
    #: ``max_sequence_length`` default (see :meth:`text_length`); ``None`` for families without a T5.
    default_text_length: ClassVar[int | None] = None
    #: (tokenizer, text encoder) component names, in the order the pipeline uses them.
    text_encoder_pairs: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"),)

    def loaded_text_encoder_pairs(self) -> list[tuple[str, str]]:
        """The pairs this pipeline holds both parts of (SD3 may be loaded without its T5, for instance)."""
        return [(t, e) for t, e in self.text_encoder_pairs
                if getattr(self.pipe, t, None) is not None and getattr(self.pipe, e, None) is not None]

    def encode_prompts(self, prompts: list[str], image_hw: tuple[int, int], *, grad: bool = False) -> Conditioning:
        """Conditioning for each prompt, with the frozen text encoders. ``""`` is the null prompt.

        ``grad=True`` keeps the graph to the text encoders' inputs (textual inversion needs it).
        """
        with torch.set_grad_enabled(grad):
            return self._encode(list(prompts), image_hw)

    def _encode(self, prompts: list[str], image_hw: tuple[int, int]) -> Conditioning:
        raise NotImplementedError

    def text_length(self) -> int:
        """The T5-style encoder's sequence length: the pipeline's own default ``max_sequence_length``.

        Erasure must condition the denoiser on the sequence a user samples with. The pipelines pad
        the T5 prompt to this length whatever the tokenizer's ``model_max_length`` says, and the
        padding is not neutral: every ``<pad>`` is a key of the joint attention (256 of them on SD3),
        so a student trained on a shorter sequence learns a conditioning it is never sampled with.
        """
        length = _call_default(type(self.pipe), "max_sequence_length")
        if isinstance(length, int):
            return length
        if self.default_text_length is None:
            raise TypeError(f"the {self.family} adapter has no text length for {type(self.pipe).__name__}")
        return self.default_text_length  # a custom pipeline class whose __call__ does not say: the family's

    # ----------------------------------------------------------------- sampling with the pipeline
    def pipeline_inputs(self, prompts: list[str], image_hw: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments for ``pipe(...)`` that ask for ``prompts`` at ``image_hw``."""
        h, w = image_hw
        return {"prompt": list(prompts), "height": h, "width": w}

    @torch.no_grad()
    def generate(self, prompts: list[str], image_hw: tuple[int, int], *, steps: int = 20,
                 seed: int = 0) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [-1, 1] sampled by the pipeline's own sampler (current weights)."""
        pipe = self.pipe
        was = getattr(pipe, "_progress_bar_config", None)
        pipe.set_progress_bar_config(disable=True)
        try:
            gen = torch.Generator("cpu").manual_seed(seed)
            with self.autocast():
                out = pipe(**self.pipeline_inputs(prompts, image_hw), num_inference_steps=steps, generator=gen,
                           output_type="pt").images
        finally:
            pipe._progress_bar_config = was if was is not None else {}
        return out.float().cpu() * 2 - 1

    # ----------------------------------------------------------------- calling
    def call(self, model: nn.Module, z_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """Raw prediction in the core's layout ``[B, C_out, H, W]`` (``C_out = 2C`` with learned variance)."""
        raise NotImplementedError

    def tap_module(self, model: nn.Module) -> nn.Module:
        """The mid-depth module whose output is tapped."""
        raise NotImplementedError

    def image_tokens(self, output: Any, z_t: torch.Tensor) -> Features:
        """Turn the tapped module's output into image-token features."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, z_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], *, features: bool = False
    ) -> tuple[torch.Tensor, Features | None]:
        """One denoiser call; with ``features=True`` also the tapped image-token features.

        The hook lives only for this call and on this very module, so a teacher and a
        student (or one LoRA-wrapped module used as both) never see each other's features.
        """
        if not features:
            return self.call(model, z_t, t, cond), None
        captured: list[Any] = []
        handle = self.tap_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            pred = self.call(model, z_t, t, cond)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{self.family} adapter: the tapped module did not run")
        return pred, self.image_tokens(captured[-1], z_t)

    def split_variance(self, out: torch.Tensor, latent_channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Separate a learned-variance output ``[B, 2C, H, W]`` into the mean prediction and the rest."""
        if out.shape[1] == 2 * latent_channels:
            return out[:, :latent_channels], out[:, latent_channels:]
        return out, None

    # ----------------------------------------------------------------- training parts
    #: in joint-attention blocks, the projections through which text reaches image tokens.
    JOINT_TEXT_PROJECTIONS: ClassVar[tuple[str, ...]] = ("add_k_proj", "add_v_proj")
    #: in cross-attention modules, the projections of the text (keys and values).
    CROSS_TEXT_PROJECTIONS: ClassVar[tuple[str, ...]] = ("to_k", "to_v")

    def attention_parameters(self, model: nn.Module, cross_only: bool = False, text_kv_only: bool = False) -> list[str]:
        """Names of parameters inside attention modules (the ``attention`` trainable set).

        With ``cross_only``: only text-to-image attention. That is every parameter of a cross-attention
        module (UNet ``attn2``, PixArt's second attention), and in joint-attention blocks (SD3, Flux) the
        image queries plus the text keys/values (``to_q``, ``add_k_proj``, ``add_v_proj``), which carry
        the text-to-image part of the joint attention map.

        With ``text_kv_only`` (implies ``cross_only``): only the projections that read the text, the
        keys and values of cross-attention (``to_k``, ``to_v``) and of joint attention's text stream
        (``add_k_proj``, ``add_v_proj``). A change there reaches an image only through the words of
        its prompt; the image-side projections, which every prompt's features pass through, stay.
        """
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        # Newer families (Flux) define their own attention classes on AttentionModuleMixin.
        kinds = (Attention, AttentionModuleMixin)
        cross_only = cross_only or text_kv_only
        names = []
        for mod_name, module in model.named_modules():
            if not isinstance(module, kinds):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            joint = getattr(module, "add_k_proj", None) is not None
            if cross_only and not joint and not getattr(module, "is_cross_attention", False):
                continue
            if text_kv_only:
                keep = self.JOINT_TEXT_PROJECTIONS if joint else self.CROSS_TEXT_PROJECTIONS
            elif cross_only and joint:
                keep = ("to_q",) + self.JOINT_TEXT_PROJECTIONS
            else:
                keep = None
            for p, _ in module.named_parameters():
                if keep is not None and not p.startswith(tuple(f"{k}." for k in keep)):
                    continue
                names.append(prefix + p)
        return sorted(set(names))

    def lora_layers_kwarg(self) -> str:
        """Keyword of the pipeline's ``save_lora_weights`` for this denoiser."""
        return f"{self.denoiser_attr}_lora_layers"

    @contextlib.contextmanager
    def eval_mode(self, model: nn.Module):
        was = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was)


@functools.lru_cache(maxsize=None)
def _call_default(pipeline_class: type, name: str) -> Any:
    """The default of ``pipeline_class.__call__``'s parameter ``name`` (``None`` if it has none). Cached per class:
    the conditioning is encoded at every training step where the names' embeddings are learned."""
    param = inspect.signature(pipeline_class.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def mid_index(n: int) -> int:
    """Middle block of ``n`` (``n // 2``): the most semantic depth, per the scrubber's design."""
    return n // 2
