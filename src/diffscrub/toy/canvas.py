"""Digit canvases: the small, fully labelled image world the toy models live in.

A canvas is a 32x32 RGB image holding one to three distinct handwritten digits from
scikit-learn's bundled ``load_digits`` set (1,797 real 8x8 samples), each scaled to
10-14 px, drawn in a bright colour from :data:`PALETTE`, placed without overlap on one
of four backgrounds: ``flat`` (a single dark colour) or a tinted crop of one of
scikit-image's bundled textures (``brick``, ``grass``, ``gravel``).

The handwriting samples are split once, by a fixed seeded permutation of their
indices, into a ``train`` part (80 %) and a ``heldout`` part (20 %). Generators,
forget/retain sets and the oracle's training data only ever use ``train`` samples;
``heldout`` samples are kept for evaluating the oracle and for checks against ground
truth.

Everything is deterministic given a :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from diffscrub.errors import InputError

SIZE = 32
"""Canvas side in pixels."""

DIGITS = tuple(str(d) for d in range(10))
BACKGROUNDS = ("flat", "brick", "grass", "gravel")
CONCEPTS = DIGITS + BACKGROUNDS
"""Every concept name the toy world knows: a digit ``"0"``..``"9"`` or a background."""

SPLITS = ("train", "heldout")
SPLIT_SEED = 20240603
TRAIN_FRACTION = 0.8

DIGIT_SIZES = (10, 11, 12, 13, 14)
PALETTE = (
    (255, 255, 255),  # white
    (255, 230, 40),  # yellow
    (60, 235, 255),  # cyan
    (255, 120, 235),  # pink
    (255, 170, 60),  # orange
    (170, 255, 110),  # light green
)
"""Digit colours: all bright, so they stand out on every (dark) background."""

FLAT_COLOUR = (38, 42, 92)
"""The ``flat`` background: a dark slate blue."""

_TEXTURE_TINTS = {
    "brick": (np.array([150.0, 62.0, 48.0]), 0.35, 0.75),
    "grass": (np.array([40.0, 135.0, 45.0]), 0.30, 0.85),
    "gravel": (np.array([118.0, 118.0, 128.0]), 0.25, 0.85),
}
"""Per texture: RGB tint, texture floor and texture gain (pixel = tint * (floor + gain * t))."""

_TEXTURE_DOWNSCALE = 4  # the 512 px textures are shrunk to 128 px so patterns show at 32 px
_ALPHA_CUTOFF = 0.12  # ink below this is dropped so a digit's box bounds all its pixels


@dataclass
class CanvasLabels:
    """Ground truth of one canvas.

    ``boxes`` are ``(x0, y0, x1, y1)`` half-open pixel boxes, one per digit, tight around
    the digit's ink: every pixel outside all boxes shows the background unchanged.
    """

    digits: list[int]
    boxes: list[tuple[int, int, int, int]]
    background: str
    sample_indices: list[int] = field(default_factory=list)
    colours: list[tuple[int, int, int]] = field(default_factory=list)
    split: str = "train"

    def concepts(self) -> set[str]:
        """Concept names present on this canvas (its digits and its background)."""
        return {str(d) for d in self.digits} | {self.background}

    def to_dict(self) -> dict:
        return asdict(self)


def check_concept(concept: str) -> str:
    """Return ``concept`` as a canonical name or raise :class:`InputError`."""
    name = str(concept).strip().lower()
    if name not in CONCEPTS:
        raise InputError(
            f"unknown toy concept {concept!r}: use a digit 0-9 or one of the backgrounds "
            f"{', '.join(BACKGROUNDS)}"
        )
    return name


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown handwriting split {split!r}: use 'train' or 'heldout'")
    return split


# --------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    ds = load_digits()
    return ds.images.astype(np.float32) / 16.0, ds.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def handwriting_split() -> dict[str, np.ndarray]:
    """Fixed split of the 1,797 handwriting indices: ``{"train": idx, "heldout": idx}``."""
    _, target = _digits_data()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(target))
    cut = int(round(TRAIN_FRACTION * len(target)))
    return {"train": np.sort(perm[:cut]), "heldout": np.sort(perm[cut:])}


@functools.lru_cache(maxsize=2)
def _indices_by_digit(split: str) -> tuple[np.ndarray, ...]:
    _, target = _digits_data()
    idx = handwriting_split()[split]
    return tuple(idx[target[idx] == d] for d in range(10))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (size, size), order=1, mode="edge", anti_aliasing=False).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _glyph(sample_index: int, size: int) -> np.ndarray:
    """Alpha mask of one handwriting sample scaled to ``size`` px, low ink cut to zero."""
    images, _ = _digits_data()
    # pad by one blank pixel so the bilinear upscale fades out at the edges
    padded = np.pad(images[sample_index], 1)
    alpha = _resize(padded, size + 2)[1:-1, 1:-1]
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[alpha < _ALPHA_CUTOFF] = 0.0
    return alpha


@functools.lru_cache(maxsize=1)
def _textures() -> dict[str, np.ndarray]:
    import skimage.data

    out = {}
    for name in ("brick", "grass", "gravel"):
        tex = getattr(skimage.data, name)().astype(np.float32) / 255.0
        side = tex.shape[0] // _TEXTURE_DOWNSCALE
        from skimage.transform import resize

        small = resize(tex, (side, side), order=1, anti_aliasing=True).astype(np.float32)
        lo, hi = np.percentile(small, [2, 98])
        small = np.clip((small - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        tint, floor, gain = _TEXTURE_TINTS[name]
        out[name] = tint[None, None, :] * (floor + gain * small[..., None])
    return out


def make_background(rng: np.random.Generator, background: str) -> np.ndarray:
    """A float32 [32, 32, 3] background in 0..255 (a random crop for textures)."""
    if background == "flat":
        return np.broadcast_to(np.array(FLAT_COLOUR, np.float32), (SIZE, SIZE, 3)).copy()
    if background not in BACKGROUNDS:
        raise InputError(f"unknown background {background!r}: use one of {', '.join(BACKGROUNDS)}")
    tex = _textures()[background]
    y = int(rng.integers(0, tex.shape[0] - SIZE + 1))
    x = int(rng.integers(0, tex.shape[1] - SIZE + 1))
    crop = tex[y : y + SIZE, x : x + SIZE]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop, dtype=np.float32)


# --------------------------------------------------------------------------- layout


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int], gap: int = 1) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    return not (
        ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay
    )


def _layout(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """Non-overlapping square slots ``(x, y, size)`` for ``n`` digits."""
    for _ in range(200):
        slots: list[tuple[int, int, int]] = []
        for _ in range(n):
            size = int(rng.choice(DIGIT_SIZES))
            for _ in range(30):
                x = int(rng.integers(0, SIZE - size + 1))
                y = int(rng.integers(0, SIZE - size + 1))
                cand = (x, y, size)
                if not any(_overlaps(cand, s) for s in slots):
                    slots.append(cand)
                    break
            else:
                break
        if len(slots) == n:
            return slots
    # fall back to a fixed grid of 10 px slots (always fits three)
    grid = [(2, 2, 10), (18, 4, 10), (9, 19, 10)]
    return [grid[i] for i in rng.permutation(3)[:n]]


# --------------------------------------------------------------------------- canvases


def make_canvas(
    rng: np.random.Generator,
    digits: list[int],
    background: str,
    split: str = "train",
) -> tuple[np.ndarray, CanvasLabels]:
    """Draw one canvas with the given (distinct) digits on ``background``.

    Returns the uint8 [32, 32, 3] image and its :class:`CanvasLabels`.
    """
    check_split(split)
    digits = [int(d) for d in digits]
    if not 1 <= len(digits) <= 3 or len(set(digits)) != len(digits) or any(not 0 <= d <= 9 for d in digits):
        raise InputError(f"digits {digits!r} must be 1 to 3 distinct values in 0..9")
    if background not in BACKGROUNDS:
        raise InputError(f"unknown background {background!r}: use one of {', '.join(BACKGROUNDS)}")

    canvas = make_background(rng, background)
    pools = _indices_by_digit(split)
    slots = _layout(rng, len(digits))
    colour_ids = rng.permutation(len(PALETTE))[: len(digits)]
    labels = CanvasLabels(digits=[], boxes=[], background=background, split=split)
    for digit, (x, y, size), cid in zip(digits, slots, colour_ids):
        sample = int(rng.choice(pools[digit]))
        alpha = _glyph(sample, size)
        colour = np.array(PALETTE[int(cid)], np.float32)
        region = canvas[y : y + size, x : x + size]
        region[:] = region * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        ys, xs = np.nonzero(alpha > 0)
        box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
        labels.digits.append(digit)
        labels.boxes.append(box)
        labels.sample_indices.append(sample)
        labels.colours.append(tuple(int(c) for c in PALETTE[int(cid)]))
    img = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return img, labels


def caption(labels: CanvasLabels | dict) -> str:
    """Caption naming exactly the canvas's digits and background.

    ``"7 on brick"``, ``"7 and 3 on grass"``, ``"7 and 3 and 1 on flat"``.
    """
    if isinstance(labels, dict):
        digits, background = labels["digits"], labels["background"]
    else:
        digits, background = labels.digits, labels.background
    return " and ".join(str(d) for d in digits) + f" on {background}"


def caption_words() -> list[str]:
    """Every word a caption can use (the toy tokenizers' vocabulary)."""
    return list(DIGITS) + ["and", "on"] + list(BACKGROUNDS)


def parse_caption(text: str) -> tuple[list[int], str | None]:
    """Inverse of :func:`caption` for well-formed captions: ``(digits, background)``."""
    words = text.strip().lower().split()
    digits = [int(w) for w in words if w in DIGITS]
    backgrounds = [w for w in words if w in BACKGROUNDS]
    return digits, (backgrounds[-1] if backgrounds else None)


def random_contents(
    rng: np.random.Generator,
    exclude: str | None = None,
    include: str | None = None,
    n_digits: tuple[int, int] | int = (1, 3),
    digit_weights: tuple[float, ...] | None = None,
) -> tuple[list[int], str]:
    """Random (digits, background) honouring ``exclude``/``include`` concept names."""
    exclude = check_concept(exclude) if exclude is not None else None
    include = check_concept(include) if include is not None else None
    if exclude is not None and exclude == include:
        raise InputError(f"concept {exclude!r} cannot be both included and excluded: drop one")
    if isinstance(n_digits, int):
        lo = hi = n_digits
    else:
        lo, hi = n_digits
    if digit_weights is not None:
        k = int(rng.choice(np.arange(lo, hi + 1), p=np.asarray(digit_weights) / np.sum(digit_weights)))
    else:
        k = int(rng.integers(lo, hi + 1))

    allowed_digits = [d for d in range(10) if str(d) != exclude]
    allowed_bgs = [b for b in BACKGROUNDS if b != exclude]
    if include in BACKGROUNDS:
        background = include
    else:
        background = str(rng.choice(allowed_bgs))
    if include in DIGITS:
        others = [d for d in allowed_digits if d != int(include)]
        digits = [int(include)] + [int(d) for d in rng.choice(others, size=k - 1, replace=False)]
        digits = [digits[i] for i in rng.permutation(len(digits))]
    else:
        digits = [int(d) for d in rng.choice(allowed_digits, size=k, replace=False)]
    return digits, background


def sample_canvases(
    n: int,
    rng: np.random.Generator,
    split: str = "train",
    exclude: str | None = None,
    include: str | None = None,
    n_digits: tuple[int, int] | int = (1, 3),
    digit_weights: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, list[CanvasLabels]]:
    """``n`` random canvases: a uint8 [n, 32, 32, 3] array and their labels.

    ``exclude`` keeps a concept off every canvas, ``include`` puts it on every canvas.
    """
    check_split(split)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels: list[CanvasLabels] = []
    for i in range(n):
        digits, background = random_contents(rng, exclude, include, n_digits, digit_weights)
        images[i], lab = make_canvas(rng, digits, background, split=split)
        labels.append(lab)
    return images, labels


def targets(labels: list[CanvasLabels]) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot digit presence [N, 10] (float32) and background index [N] (int64)."""
    presence = np.zeros((len(labels), 10), np.float32)
    bg = np.zeros(len(labels), np.int64)
    for i, lab in enumerate(labels):
        presence[i, lab.digits] = 1.0
        bg[i] = BACKGROUNDS.index(lab.background)
    return presence, bg
