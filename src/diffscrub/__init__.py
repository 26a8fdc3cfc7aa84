"""diffscrub: erase a visual concept from a latent diffusion model with only unlabeled images.

Public API::

    from diffscrub import erase, EraseConfig, list_methods, list_families
    erase(EraseConfig(model="toy-unet", forget="forget/", retain="retain/", out="erased/"))

Heavy imports (torch, diffusers) happen on first use of these names, not on ``import diffscrub``.
"""

__version__ = "0.1.0"

_LAZY = {
    "erase": ("diffscrub.core.trainer", "erase"),
    "erase_in_passes": ("diffscrub.core.passes", "erase_in_passes"),
    "EraseConfig": ("diffscrub.config", "EraseConfig"),
    "list_methods": ("diffscrub.methods", "list_methods"),
    "list_families": ("diffscrub.adapters", "list_families"),
    "adapter_for": ("diffscrub.adapters", "adapter_for"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'diffscrub' has no attribute {name!r}")
