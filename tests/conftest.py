"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


def _tiny_pipelines():
    # Imported lazily: diffusers/transformers take seconds to import, and most
    # test modules never ask for a pipeline.
    try:
        import tiny_pipelines
    except ImportError:  # tests/ imported as a package
        from tests import tiny_pipelines
    return tiny_pipelines


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """Return ``get(name) -> Path``: a saved tiny pipeline folder of family ``name``.

    ``name`` is one of ``tiny_pipelines.FAMILIES``.  Each family is built
    (seed 0) and saved with ``save_pretrained`` at most once per test session;
    later calls return the cached folder.  Treat the folders as read-only.
    """
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            tp = _tiny_pipelines()
            if name not in tp.FAMILIES:
                raise ValueError(f"unknown family {name!r}; expected one of {tp.FAMILIES}")
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            cache[name] = tp.save_tiny_pipeline(name, folder)
        return cache[name]

    return get


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models are dominated by per-op overhead; with more threads than free cores, OpenMP
    spin-waiting makes them many times slower (seen on 2-core machines), so tests use one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
