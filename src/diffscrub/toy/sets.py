"""Forget and retain image folders for a toy concept.

``make_sets(concept, out_dir)`` writes ``out_dir/forget/*.png`` (canvases that each show
the concept among clutter: two or three digits on random backgrounds, or random digits
on the concept's background) and ``out_dir/retain/*.png`` (canvases without the
concept). Only PNG files are written, no labels or captions: this is what a user who
owns some images of the concept would have.

The sets are drawn from the *train* handwriting split, like images a user owns; the
held-out split stays reserved for evaluating the oracle and for checks against ground
truth, so no evaluation ever sees the handwriting shown to an erasure method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffscrub.errors import InputError
from diffscrub.toy.canvas import BACKGROUNDS, CanvasLabels, check_concept, sample_canvases


def make_sets(
    concept: str,
    out_dir: str | Path,
    n: int = 64,
    seed: int = 0,
    n_retain: int | None = None,
    split: str = "train",
) -> dict[str, list[CanvasLabels]]:
    """Write ``forget/`` and ``retain/`` PNG folders under ``out_dir``.

    Returns the ground-truth labels of what was written: ``{"forget": [...], "retain": [...]}``
    (in file-name order). Raises :class:`InputError` for an unknown concept, a bad count or an
    output folder that already holds files.
    """
    concept = check_concept(concept)
    if int(n) < 1:
        raise InputError(f"set size n={n} must be at least 1")
    n_retain = int(n if n_retain is None else n_retain)
    if n_retain < 1:
        raise InputError(f"retain size {n_retain} must be at least 1")
    out = Path(out_dir)
    for sub in ("forget", "retain"):
        d = out / sub
        if d.exists() and any(d.iterdir()):
            raise InputError(f"output folder {d} is not empty: pick a new --out or empty it")

    rng = np.random.default_rng(seed)
    # clutter on purpose: a digit concept comes with 1-2 other digits, a background with any
    n_digits = (1, 3) if concept in BACKGROUNDS else (2, 3)
    forget_imgs, forget_labels = sample_canvases(int(n), rng, split=split, include=concept, n_digits=n_digits)
    retain_imgs, retain_labels = sample_canvases(n_retain, rng, split=split, exclude=concept, n_digits=(1, 3))

    written: dict[str, list[CanvasLabels]] = {}
    for sub, imgs, labels in (("forget", forget_imgs, forget_labels), ("retain", retain_imgs, retain_labels)):
        d = out / sub
        d.mkdir(parents=True, exist_ok=True)
        width = max(4, len(str(len(imgs))))
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(d / f"{i:0{width}d}.png")
        written[sub] = labels
    return written
