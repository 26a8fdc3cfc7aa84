"""Folders of seeded random RGB images, the input most tests that run an erase need."""

from __future__ import annotations

import numpy as np
from PIL import Image


def write_random_images(folder, n: int = 4, size: int = 32):
    """``n`` PNGs of ``size``x``size`` noise in ``folder`` (image ``i`` seeded with ``i``); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder
