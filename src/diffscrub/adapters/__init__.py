"""One adapter per denoiser family, chosen from the pipeline's class (``--family`` forces one)."""

from __future__ import annotations

from ..errors import UnknownFamilyError
from ..registry import Registry
from .base import Conditioning, DenoiserAdapter, Features, concat_kwargs
from .dit import DiTAdapter, PixArtAdapter
from .mmdit import FluxAdapter, SD3Adapter
from .unet import StableDiffusionAdapter, StableDiffusionXLAdapter

ADAPTERS: Registry[type[DenoiserAdapter]] = Registry("family", "--family")
# Order matters for automatic selection: more specific pipeline prefixes first (SDXL, SD3 before SD).
for _cls in (StableDiffusionXLAdapter, SD3Adapter, StableDiffusionAdapter, FluxAdapter, PixArtAdapter, DiTAdapter):
    ADAPTERS.register(_cls.family, _cls)


def list_families() -> list[str]:
    return ADAPTERS.names()


def adapter_for(pipe, family: str | None = None) -> DenoiserAdapter:
    """The adapter for ``pipe``: the one named by ``family``, else the first whose ``matches`` accepts it."""
    if family:
        return ADAPTERS.get(family)(pipe)
    for _name, cls in ADAPTERS.items():
        if cls.matches(pipe):
            return cls(pipe)
    raise UnknownFamilyError(
        f"no adapter knows pipeline {type(pipe).__name__}: pass --family with one of {', '.join(list_families())}"
    )


__all__ = [
    "ADAPTERS", "Conditioning", "DenoiserAdapter", "Features", "adapter_for", "concat_kwargs", "list_families",
]
