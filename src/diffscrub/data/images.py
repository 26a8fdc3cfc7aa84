"""Load a folder of unlabeled images into a tensor, robustly.

Two entry points:

* :func:`scan_image_folder` is the cheap check the command line runs before any model
  loads: the folder exists, is a readable directory and holds at least one file with an
  image extension.
* :func:`load_image_folder` decodes every regular file in the folder (by content, so a
  valid PNG named ``x.dat`` loads), skips what cannot be used (not an image, corrupt,
  truncated, empty, unreadable, broken or looping symlinks, decompression-bomb sized),
  converts every mode to 8-bit RGB, applies EXIF orientation, optionally resizes and
  center-crops, and returns an :class:`ImageSet` with images in ``[-1, 1]``.

The folder is read non-recursively: subdirectories and hidden files (names starting with
``.``, such as ``.DS_Store``) are ignored and not counted. Every user-facing failure is an
:class:`~diffscrub.errors.InputError` (or :class:`~diffscrub.errors.ConfigError` for a bad
argument) whose message is a single line naming the folder or file and the fix.
"""

from __future__ import annotations

import errno
import os
import pathlib
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffscrub.errors import ConfigError, InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "scan_image_folder",
    "load_image_folder",
]

#: Extensions :func:`scan_image_folder` accepts as "an image file" (compared lower-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)

# Pillow formats we let content sniffing pick. Formats with no magic number (TGA) or that
# shell out to external programs (EPS -> Ghostscript) are left out on purpose.
_ALLOWED_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "WEBP",
    "BMP",
    "DIB",
    "GIF",
    "TIFF",
    "PPM",
    "ICO",
    "QOI",
    "AVIF",
    "JPEG2000",
)

# category -> (singular, plural) wording for the summary warning / error.
_CATEGORY_WORDS: dict[str, tuple[str, str]] = {
    "not image": ("not an image", "not images"),
    "corrupt": ("corrupt", "corrupt"),
    "truncated": ("truncated", "truncated"),
    "empty": ("empty file", "empty files"),
    "unreadable": ("unreadable", "unreadable"),
    "broken symlink": ("broken symlink", "broken symlinks"),
    "symlink loop": ("symlink loop", "symlink loops"),
    "too large": ("too large", "too large"),
    "unsupported mode": ("unsupported mode", "unsupported modes"),
    "not regular": ("not a regular file", "not regular files"),
}

_MODES_WITH_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


@dataclass
class ImageSet:
    """Decoded images of one folder.

    Attributes:
        pixels: ``[N, 3, H, W]`` uint8, as decoded. Kept in 8 bits (a quarter of float32): a folder of
            1,000 images at 1024 px is 3 GiB here, and the float form is made a batch at a time.
        paths: the file each image came from, one per image, in sorted (name) order.
        skipped: ``(path, short reason)`` for each file that was not used.
        converted: how many images were converted to RGB from another mode.
    """

    pixels: torch.Tensor
    paths: list[pathlib.Path]
    skipped: list[tuple[pathlib.Path, str]] = field(default_factory=list)
    converted: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[-2:])

    def floats(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``start:stop`` as ``[n, 3, H, W]`` float32 in ``[-1, 1]``."""
        return to_float(self.pixels[start:stop])

    @property
    def images(self) -> torch.Tensor:
        """All images as ``[N, 3, H, W]`` float32 in ``[-1, 1]`` (four times the memory of ``pixels``)."""
        return self.floats()


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 in ``[-1, 1]``; float input is returned as it is."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.to(torch.float32).div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)


class _Skip(Exception):
    """Internal: this file cannot be used. ``category`` keys ``_CATEGORY_WORDS``."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


# --------------------------------------------------------------------------------------
# Folder checks
# --------------------------------------------------------------------------------------


def _show_folder(folder: os.PathLike | str) -> str:
    text = os.fspath(folder)
    if isinstance(text, bytes):  # pragma: no cover - bytes paths are unusual
        text = os.fsdecode(text)
    return text if text.endswith(("/", os.sep)) else text + "/"


def _fix(name: str) -> str:
    return f"pass --{name} DIR pointing at a folder of images"


def _one_line(text: object, limit: int = 120) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_folder(folder: os.PathLike | str, name: str) -> pathlib.Path:
    """Raise InputError unless ``folder`` is an existing, readable directory."""
    if folder is None or (isinstance(folder, str) and not folder.strip()):
        raise InputError(f"no {name} folder given: {_fix(name)}")
    try:
        path = pathlib.Path(folder)
    except TypeError:
        raise InputError(f"{name} folder {folder!r} is not a path: {_fix(name)}") from None
    shown = _show_folder(folder)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(
                f"{name} folder '{shown}' is a broken symlink: {_fix(name)}"
            ) from None
        raise InputError(f"{name} folder '{shown}' does not exist: {_fix(name)}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{name} folder '{shown}' is a symlink loop: {_fix(name)}") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InputError(
                f"{name} folder '{shown}' cannot be accessed (permission denied): "
                f"make it readable (chmod +rx) or {_fix(name)}"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise InputError(
                f"{name} folder '{shown}' does not exist (a parent is a file): {_fix(name)}"
            ) from None
        raise InputError(
            f"{name} folder '{shown}' cannot be read ({_one_line(exc.strerror or exc)}): {_fix(name)}"
        ) from None
    except ValueError as exc:  # e.g. embedded NUL byte
        raise InputError(f"{name} folder {shown!r} is not a valid path ({exc}): {_fix(name)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(
            f"{name} folder '{shown}' is a file, not a folder: "
            f"put the images in a folder and {_fix(name)}"
        )
    return path


def _list_files(path: pathlib.Path, shown: str, name: str) -> list[pathlib.Path]:
    """Non-hidden, non-directory entries of ``path`` sorted by name (no recursion)."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except PermissionError:
        raise InputError(
            f"{name} folder '{shown}' cannot be read (permission denied): "
            f"make it readable (chmod +rx) or {_fix(name)}"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{name} folder '{shown}' cannot be listed ({_one_line(exc.strerror or exc)}): {_fix(name)}"
        ) from None
    files = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            # Follows symlinks; returns False (not raises) for broken links and loops,
            # which are kept here and reported as skipped when loading.
            if entry.is_dir():
                continue
        except OSError:
            pass
        files.append(path / entry.name)
    files.sort(key=lambda p: p.name)
    return files


def _stat_file(path: pathlib.Path) -> os.stat_result:
    """``os.stat`` following symlinks, mapping failures to :class:`_Skip`."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _Skip("broken symlink", "broken symlink") from None
        raise _Skip("unreadable", "vanished while reading") from None
    except PermissionError:
        raise _Skip("unreadable", "unreadable: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Skip("symlink loop", "symlink loop") from None
        raise _Skip("unreadable", f"unreadable: {_one_line(exc.strerror or exc, 60)}") from None


def _has_image_extension(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan_image_folder(folder: os.PathLike | str, *, name: str = "forget") -> list[pathlib.Path]:
    """Cheap pre-flight check of an image folder; runs before any model loads.

    Returns the regular files in ``folder`` (non-recursive, hidden files ignored) whose
    extension is one of :data:`IMAGE_EXTENSIONS`, sorted by name. Raises
    :class:`~diffscrub.errors.InputError` when the folder is missing, not a directory,
    unreadable, empty, or holds no file with an image extension. Nothing is decoded.
    """
    path = _check_folder(folder, name)
    shown = _show_folder(folder)
    files = _list_files(path, shown, name)
    if not files:
        raise InputError(
            f"{name} folder '{shown}' is empty: put images ({' '.join(IMAGE_EXTENSIONS)}) "
            f"in it or {_fix(name)}"
        )
    found = []
    for file in files:
        if not _has_image_extension(file):
            continue
        try:
            st = _stat_file(file)
        except _Skip:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append(file)
    if not found:
        raise InputError(
            f"{name} folder '{shown}' has no image files ({len(files)} "
            f"{'file' if len(files) == 1 else 'files'}, none a readable file ending in "
            f"{' '.join(IMAGE_EXTENSIONS)}; first was '{files[0]}'): add images or {_fix(name)}"
        )
    return found


# --------------------------------------------------------------------------------------
# Decoding one file
# --------------------------------------------------------------------------------------


def _classify_decode_error(exc: BaseException) -> _Skip:
    if isinstance(exc, Image.DecompressionBombError):
        return _Skip("too large", f"too large: {_one_line(exc, 80)}")
    if isinstance(exc, UnidentifiedImageError):
        return _Skip("not image", "not an image (or an unsupported format)")
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return _Skip("truncated", "truncated")
    if isinstance(exc, MemoryError):
        return _Skip("too large", "too large: out of memory while decoding")
    text = _one_line(exc, 60)
    return _Skip("corrupt", f"corrupt: {text}" if text else f"corrupt ({type(exc).__name__})")


def _to_uint8_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel integer / float array to uint8 (H, W)."""
    a = np.asarray(arr, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=np.finfo(np.float64).max, neginf=-np.finfo(np.float64).max)
    lo = float(a.min()) if a.size else 0.0
    hi = float(a.max()) if a.size else 0.0
    if mode.startswith("I;16"):
        if lo >= 0:
            out = a / 257.0  # 0..65535 -> 0..255
        else:  # signed 16-bit
            out = (a + 32768.0) / 257.0
    elif mode == "I":
        if lo >= 0 and hi <= 255:
            out = a  # already 8-bit scale
        elif lo >= 0 and hi <= 65535:
            out = a / 257.0  # 16-bit data held in a 32-bit image
        else:
            out = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:  # "F" and anything else numeric
        if lo >= 0 and hi <= 1.0:
            out = a * 255.0
        elif lo >= 0 and hi <= 255:
            out = a
        else:
            out = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "I" or mode == "F" or mode.startswith("I;16"):
        gray = _to_uint8_gray(np.asarray(img), mode)
        return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))
    if mode in _MODES_WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(path: pathlib.Path, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode one file to an (H, W, 3) uint8 array; return it with the source mode."""
    st = _stat_file(path)
    if not stat.S_ISREG(st.st_mode):
        raise _Skip("not regular", "not a regular file")
    if st.st_size == 0:
        raise _Skip("empty", "empty file (0 bytes)")
    try:
        fh = open(path, "rb")
    except PermissionError:
        raise _Skip("unreadable", "unreadable: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Skip("symlink loop", "symlink loop") from None
        raise _Skip("unreadable", f"unreadable: {_one_line(exc.strerror or exc, 60)}") from None
    with fh, warnings.catch_warnings():
        # Our own max_pixels check is authoritative; Pillow's chatter (bomb warnings,
        # odd EXIF, palette transparency) must not leak out as noise.
        warnings.simplefilter("ignore")
        try:
            img = Image.open(fh, formats=_ALLOWED_FORMATS)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a skip
            raise _classify_decode_error(exc) from None
        try:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise _Skip("corrupt", f"corrupt: image size {width}x{height}")
            if width * height > max_pixels:
                raise _Skip(
                    "too large",
                    f"too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels}",
                )
            img.load()
            mode = img.mode
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
                oriented = img
            if oriented is None:  # pragma: no cover - only with in_place=True
                oriented = img
            try:
                rgb = _to_rgb(oriented)
            except (ValueError, KeyError, NotImplementedError) as exc:
                raise _Skip("unsupported mode", f"unsupported mode {mode}: {_one_line(exc, 40)}") from None
            arr = np.asarray(rgb, dtype=np.uint8)
        except _Skip:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _classify_decode_error(exc) from None
        finally:
            img.close()
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _Skip("corrupt", f"corrupt: decoded to shape {arr.shape}")
    return np.ascontiguousarray(arr), mode


def _resize_center_crop(arr: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` then center-crop to a square."""
    h, w = arr.shape[:2]
    if h == resolution and w == resolution:
        return arr
    scale = resolution / min(h, w)
    new_w = max(resolution, int(round(w * scale)))
    new_h = max(resolution, int(round(h * scale)))
    img = Image.fromarray(arr)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------


def _summary(categories: list[str]) -> str:
    counts = Counter(categories)
    parts = []
    for cat, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        one, many = _CATEGORY_WORDS.get(cat, (cat, cat))
        parts.append(f"{n} {one if n == 1 else many}")
    return ", ".join(parts)


def load_image_folder(
    folder: os.PathLike | str,
    *,
    name: str = "forget",
    resolution: int | None = None,
    max_pixels: int = 64_000_000,
    warn: Callable[[str], object] = warnings.warn,
) -> ImageSet:
    """Decode every usable image in ``folder`` into an :class:`ImageSet`.

    Args:
        folder: the folder to read (non-recursive; hidden files and subfolders ignored).
        name: what the folder is for (``"forget"``, ``"retain"``); used in messages and
            in the suggested fix ``--{name} DIR``.
        resolution: if given, every image is resized (shorter side, LANCZOS) and
            center-cropped to ``resolution x resolution``. If ``None``, all images must
            have the same size, which is kept.
        max_pixels: files whose header claims more pixels are skipped before decoding.
        warn: called with one line summarising skipped files and one summarising mode
            conversions (each at most once).

    Raises:
        InputError: folder missing / not a folder / unreadable / empty, no usable image,
            or mixed sizes without ``resolution``.
        ConfigError: ``resolution`` or ``max_pixels`` is not a positive integer.
    """
    if resolution is not None and (
        isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1
    ):
        raise ConfigError(
            f"resolution must be a positive integer, got {resolution!r}: pass --resolution N "
            f"with N >= 1 (for example 512), or leave it out to keep the images' own size"
        )
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}: use e.g. 64000000")
    resolution = None if resolution is None else int(resolution)

    path = _check_folder(folder, name)
    shown = _show_folder(folder)
    files = _list_files(path, shown, name)
    if not files:
        raise InputError(
            f"{name} folder '{shown}' is empty: put images ({' '.join(IMAGE_EXTENSIONS)}) "
            f"in it or {_fix(name)}"
        )

    pixels: torch.Tensor | None = None  # [len(files), 3, H, W] uint8, filled in place (no second copy)
    paths: list[pathlib.Path] = []
    skipped: list[tuple[pathlib.Path, str]] = []
    categories: list[str] = []
    converted_modes: Counter[str] = Counter()
    first_size: tuple[pathlib.Path, int, int] | None = None

    for file in files:
        try:
            arr, mode = _decode(file, int(max_pixels))
        except _Skip as skip:
            skipped.append((file, skip.reason))
            categories.append(skip.category)
            continue
        if mode != "RGB":
            converted_modes[mode] += 1
        h, w = arr.shape[:2]
        if resolution is not None:
            arr = _resize_center_crop(arr, resolution)
        elif first_size is None:
            first_size = (file, w, h)
        elif (w, h) != first_size[1:]:
            f0, w0, h0 = first_size
            raise InputError(
                f"{name} folder '{shown}' has images of different sizes ('{f0}' is {w0}x{h0}, "
                f"'{file}' is {w}x{h}): pass --resolution N to resize and center-crop every "
                f"image to N×N"
            )
        if pixels is None:
            pixels = torch.empty((len(files), 3, *arr.shape[:2]), dtype=torch.uint8)
        pixels.numpy()[len(paths)] = arr.transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W], copied in place
        paths.append(file)

    total = len(files)
    if not paths:
        raise InputError(
            f"no usable image in {name} folder '{shown}': all {total} "
            f"{'file was' if total == 1 else 'files were'} skipped ({_summary(categories)}; "
            f"first was '{skipped[0][0]}': {skipped[0][1]}): add readable images "
            f"({' '.join(IMAGE_EXTENSIONS)}) or {_fix(name)}"
        )

    if skipped:
        warn(
            f"skipped {len(skipped)} of {total} files in {name} folder '{shown}' "
            f"({_summary(categories)}): first was '{skipped[0][0]}' ({skipped[0][1]})"
        )
    converted = sum(converted_modes.values())
    if converted:
        modes = ", ".join(f"{n} {m}" for m, n in sorted(converted_modes.items(), key=lambda kv: (-kv[1], kv[0])))
        warn(
            f"converted {converted} of {len(paths)} images in {name} folder '{shown}' "
            f"to 8-bit RGB ({modes})"
        )

    if len(paths) < len(files):  # skipped files leave unused rows at the end
        pixels = pixels[: len(paths)].clone()
    return ImageSet(pixels=pixels, paths=paths, skipped=skipped, converted=converted)
