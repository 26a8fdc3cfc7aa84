"""Tests of diffscrub.data.images: scanning and loading folders of unlabeled images."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import struct
import tempfile
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffscrub.data import ImageSet, load_image_folder, scan_image_folder
from diffscrub.errors import ConfigError, DiffscrubError, InputError

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _rgb(w: int = 8, h: int = 8, color=(10, 200, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def _save(img: Image.Image, path: pathlib.Path, fmt: str | None = None, **kw) -> pathlib.Path:
    img.save(path, format=fmt, **kw)
    return path


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _load(folder, **kw) -> tuple[ImageSet, list[str]]:
    msgs: list[str] = []
    out = load_image_folder(folder, warn=msgs.append, **kw)
    return out, msgs


def _pixel(out: ImageSet, i: int = 0, y: int = 0, x: int = 0) -> tuple[int, int, int]:
    """The 8-bit RGB value of one output pixel."""
    v = ((out.images[i, :, y, x] + 1.0) * 127.5).round().to(torch.int64).tolist()
    return tuple(v)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (RGB, 8-bit); nothing large is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------
# scan_image_folder / folder-level errors
# --------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as ei:
        scan_image_folder(missing)
    msg = str(ei.value)
    assert "forget folder" in msg and str(missing) in msg and "does not exist" in msg
    assert "--forget DIR" in msg and "\n" not in msg
    with pytest.raises(InputError, match="does not exist"):
        load_image_folder(missing, name="retain")
    with pytest.raises(InputError, match="--retain DIR"):
        scan_image_folder(missing, name="retain")


def test_file_instead_of_folder(tmp_path):
    f = _save(_rgb(), tmp_path / "a.png")
    for fn in (scan_image_folder, load_image_folder):
        with pytest.raises(InputError) as ei:
            fn(f)
        assert str(f) in str(ei.value) and "is a file, not a folder" in str(ei.value)
        assert "--forget DIR" in str(ei.value)


def test_empty_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    (d / "sub").mkdir()  # subfolders are ignored
    for fn in (scan_image_folder, load_image_folder):
        with pytest.raises(InputError) as ei:
            fn(d)
        assert f"'{d}/'" in str(ei.value) and "is empty" in str(ei.value)


def test_folder_symlink_loop(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for fn in (scan_image_folder, load_image_folder):
        with pytest.raises(InputError, match="symlink loop"):
            fn(loop)


def test_scan_returns_sorted_image_files(tmp_path):
    for n in ("c.JPG", "a.png", "b.tiff", "notes.txt", "d.webp"):
        (tmp_path / n).write_bytes(b"x")  # scan does not decode
    (tmp_path / "sub.png").mkdir()
    got = scan_image_folder(tmp_path)
    assert [p.name for p in got] == ["a.png", "b.tiff", "c.JPG", "d.webp"]


def test_scan_only_non_images(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.csv").write_text("1,2")
    with pytest.raises(InputError) as ei:
        scan_image_folder(tmp_path)
    msg = str(ei.value)
    assert "has no image files" in msg and str(tmp_path / "a.txt") in msg and "\n" not in msg


def test_only_non_images_load(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.png").write_text("not really a png")
    with pytest.raises(InputError) as ei:
        load_image_folder(tmp_path)
    msg = str(ei.value)
    assert "no usable image" in msg and f"'{tmp_path}/'" in msg
    assert "2 not images" in msg and str(tmp_path / "a.txt") in msg and "--forget DIR" in msg


# --------------------------------------------------------------------------------------
# skipped files
# --------------------------------------------------------------------------------------


def test_corrupt_png_skipped(tmp_path):
    _save(_rgb(), tmp_path / "good.png")
    data = bytearray(_bytes(_rgb(16, 16, (1, 2, 3)), "PNG"))
    data[40:60] = b"\xff" * 20  # garbage inside IDAT
    (tmp_path / "bad.png").write_bytes(bytes(data))
    out, msgs = _load(tmp_path)
    assert out.images.shape == (1, 3, 8, 8)
    assert [p.name for p in out.paths] == ["good.png"]
    assert len(out.skipped) == 1 and out.skipped[0][0].name == "bad.png"
    assert len(msgs) == 1 and "skipped 1 of 2 files in forget folder" in msgs[0]
    assert str(tmp_path / "bad.png") in msgs[0]


def test_zero_byte_skipped(tmp_path):
    _save(_rgb(), tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    out, msgs = _load(tmp_path)
    assert len(out) == 1 and out.skipped == [(tmp_path / "b.png", "empty file (0 bytes)")]
    assert "1 empty file" in msgs[0]


def test_truncated_jpeg_skipped(tmp_path):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _bytes(noisy, "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _save(_rgb(64, 64), tmp_path / "ok.jpg")
    out, msgs = _load(tmp_path)
    assert [p.name for p in out.paths] == ["ok.jpg"]
    assert out.skipped == [(tmp_path / "cut.jpg", "truncated")]
    assert "(1 truncated)" in msgs[0]


def test_skip_summary_counts_and_first(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    (tmp_path / "b.txt").write_text("there")
    (tmp_path / "c.png").write_bytes(b"")
    for i in range(3):
        _save(_rgb(), tmp_path / f"img{i}.png")
    out, msgs = _load(tmp_path)
    assert len(out) == 3 and len(out.skipped) == 3
    assert msgs == [
        f"skipped 3 of 6 files in forget folder '{tmp_path}/' (2 not images, 1 empty file): "
        f"first was '{tmp_path / 'a.txt'}' (not an image (or an unsupported format))"
    ]


def test_unreadable_skipped(tmp_path):
    _save(_rgb(), tmp_path / "a.png")
    locked = _save(_rgb(), tmp_path / "b.png")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads")
        out, msgs = _load(tmp_path)
        assert [p.name for p in out.paths] == ["a.png"]
        assert out.skipped == [(locked, "unreadable: permission denied")]
        assert "1 unreadable" in msgs[0]
    finally:
        locked.chmod(0o644)


def test_unreadable_simulated(tmp_path, monkeypatch):
    """The same path as chmod 000, reached even when running as root."""
    import builtins

    import diffscrub.data.images as images_mod

    _save(_rgb(), tmp_path / "a.png")
    _save(_rgb(), tmp_path / "b.png")
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if pathlib.Path(path).name == "b.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images_mod, "open", fake_open, raising=False)
    out, msgs = _load(tmp_path)
    assert [p.name for p in out.paths] == ["a.png"]
    assert out.skipped == [(tmp_path / "b.png", "unreadable: permission denied")]
    assert "(1 unreadable)" in msgs[0]

    def fake_scandir(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_mod.os, "scandir", fake_scandir)
    with pytest.raises(InputError) as ei:
        load_image_folder(tmp_path)
    assert f"'{tmp_path}/' cannot be read (permission denied)" in str(ei.value)
    assert "chmod +rx" in str(ei.value)


def test_unreadable_folder(tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    _save(_rgb(), d / "a.png")
    d.chmod(0)
    try:
        if os.access(d, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads")
        with pytest.raises(InputError, match="permission denied"):
            load_image_folder(d)
    finally:
        d.chmod(0o755)


def test_symlinks_loop_and_broken_skipped(tmp_path):
    _save(_rgb(), tmp_path / "a.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")  # points at itself
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    os.symlink(tmp_path / "a.png", tmp_path / "z_link.png")  # a good link is used
    t0 = time.monotonic()
    out, msgs = _load(tmp_path)
    assert time.monotonic() - t0 < 5
    assert [p.name for p in out.paths] == ["a.png", "z_link.png"]
    assert out.skipped == [
        (tmp_path / "broken.png", "broken symlink"),
        (tmp_path / "loop.png", "symlink loop"),
    ]
    assert "1 broken symlink" in msgs[0] and "1 symlink loop" in msgs[0]
    # scan ignores them too and still finds the good files
    assert [p.name for p in scan_image_folder(tmp_path)] == ["a.png", "z_link.png"]


def test_decompression_bomb_header_skipped(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(100_000, 100_000))
    assert bomb.stat().st_size < 200
    _save(_rgb(), tmp_path / "ok.png")
    t0 = time.monotonic()
    out, msgs = _load(tmp_path)
    assert time.monotonic() - t0 < 5
    assert [p.name for p in out.paths] == ["ok.png"]
    assert len(out.skipped) == 1 and out.skipped[0][0] == bomb
    assert out.skipped[0][1].startswith("too large")
    assert "1 too large" in msgs[0]


def test_header_over_max_pixels_skipped_before_decoding(tmp_path):
    # 10000 x 9000 = 90M pixels: over our default cap, under Pillow's hard error limit.
    (tmp_path / "big.png").write_bytes(_bomb_png(10_000, 9_000))
    _save(_rgb(), tmp_path / "ok.png")
    out, _ = _load(tmp_path)
    assert out.skipped == [
        (tmp_path / "big.png", "too large: 10000x9000 = 90000000 pixels > max_pixels=64000000")
    ]
    # and the cap is configurable
    (tmp_path / "big.png").unlink()
    _save(_rgb(40, 40), tmp_path / "medium.png")
    out, _ = _load(tmp_path, max_pixels=1000, resolution=8)
    assert [p.name for p in out.paths] == ["ok.png"]
    assert out.skipped[0][1].startswith("too large: 40x40")


# --------------------------------------------------------------------------------------
# modes and orientation
# --------------------------------------------------------------------------------------


def test_rgb_values_and_range(tmp_path):
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[0, 0] = (255, 255, 255)
    arr[1, 2] = (255, 0, 128)
    _save(Image.fromarray(arr), tmp_path / "a.png")
    out, msgs = _load(tmp_path)
    assert msgs == [] and out.converted == 0 and out.skipped == []
    assert out.images.dtype == torch.float32 and out.images.shape == (1, 3, 4, 6)
    assert out.images.min().item() == -1.0 and out.images.max().item() == 1.0
    assert _pixel(out, y=1, x=2) == (255, 0, 128)
    assert out.paths == [tmp_path / "a.png"]


def test_grayscale_converted(tmp_path):
    _save(Image.new("L", (5, 5), 200), tmp_path / "g.png")
    out, msgs = _load(tmp_path)
    assert out.images.shape == (1, 3, 5, 5) and out.converted == 1
    assert _pixel(out) == (200, 200, 200)
    assert msgs == [f"converted 1 of 1 images in forget folder '{tmp_path}/' to 8-bit RGB (1 L)"]


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent -> white
    _save(img, tmp_path / "a.png")
    out, _ = _load(tmp_path)
    assert out.converted == 1
    assert _pixel(out, x=0) == (255, 0, 0)
    assert _pixel(out, x=1) == (255, 255, 255)


def test_palette_converted(tmp_path):
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0] * (254 * 3))
    _save(img, tmp_path / "p.gif")
    _save(Image.new("L", (3, 3), 7), tmp_path / "q.png")
    out, msgs = _load(tmp_path)
    assert out.converted == 2 and out.images.shape == (2, 3, 3, 3)
    assert _pixel(out, 0) == (12, 34, 56)
    assert "converted 2 of 2 images" in msgs[0] and "1 P" in msgs[0] and "1 L" in msgs[0]


def test_cmyk_jpeg_converted(tmp_path):
    _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    out, _ = _load(tmp_path)
    assert out.converted == 1
    r, g, b = _pixel(out, y=4, x=4)
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("value,expected", [(32768, 128), (65535, 255), (16384, 64), (0, 0)])
def test_16bit_png_scaled(tmp_path, value, expected):
    arr = np.full((4, 4), value, dtype=np.uint16)
    _save(Image.fromarray(arr), tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")
    out, msgs = _load(tmp_path)
    assert out.converted == 1
    assert _pixel(out) == (expected,) * 3
    if value == 32768:  # mid gray stays mid gray, not clipped to white
        assert abs(out.images.mean().item()) < 0.01
    assert "to 8-bit RGB" in msgs[0]


def test_float_and_int32_modes(tmp_path):
    _save(Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32)), tmp_path / "f.tif")
    _save(Image.fromarray(np.full((3, 3), 40000, dtype=np.int32)), tmp_path / "i.tif")
    out, _ = _load(tmp_path)
    assert out.converted == 2
    assert _pixel(out, 0) == (128, 128, 128)  # F in [0, 1] -> x255
    assert _pixel(out, 1) == (156, 156, 156)  # I holding 16-bit data -> /257


def test_exif_rotated_jpeg(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    _save(img, tmp_path / "r.jpg", quality=95, exif=exif.tobytes())
    out, _ = _load(tmp_path)
    assert out.images.shape == (1, 3, 40, 20)  # H=40, W=20 after rotation
    top, bottom = _pixel(out, y=5, x=10), _pixel(out, y=35, x=10)
    assert top[0] > 200 and top[2] < 60  # left (red) ends up on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert out.converted == 0


def test_wrong_extension_valid_content(tmp_path):
    (tmp_path / "photo.txt").write_bytes(_bytes(_rgb(6, 6, (9, 99, 199)), "PNG"))
    (tmp_path / "other.jpg").write_bytes(_bytes(_rgb(6, 6, (9, 99, 199)), "PNG"))
    out, msgs = _load(tmp_path)
    assert [p.name for p in out.paths] == ["other.jpg", "photo.txt"]
    assert out.skipped == [] and msgs == []
    assert _pixel(out, 1) == (9, 99, 199)


# --------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------


def test_mixed_sizes_error(tmp_path):
    _save(_rgb(64, 48), tmp_path / "a.png")
    _save(_rgb(64, 48), tmp_path / "b.png")
    _save(_rgb(32, 32), tmp_path / "c.png")
    with pytest.raises(InputError) as ei:
        load_image_folder(tmp_path)
    msg = str(ei.value)
    assert f"'{tmp_path / 'a.png'}' is 64x48" in msg and f"'{tmp_path / 'c.png'}' is 32x32" in msg
    assert "pass --resolution N to resize and center-crop every image to N×N" in msg
    assert "\n" not in msg


def test_resolution_resizes_and_center_crops(tmp_path):
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (16, 0, 48, 32))  # red center band, blue sides
    _save(wide, tmp_path / "a.png")
    _save(_rgb(20, 50, (0, 255, 0)), tmp_path / "b.png")
    out, _ = _load(tmp_path, resolution=16)
    assert out.images.shape == (2, 3, 16, 16)
    # 64x32 -> 32x16 -> crop the middle 16 columns: the red band (edges ring a little)
    assert (out.images[0, 0] > 0.5).all() and (out.images[0, 2] < -0.5).all()
    assert torch.allclose(out.images[0, 0, :, 2:14], torch.ones(16, 12), atol=0.02)
    assert _pixel(out, 1, 8, 8) == (0, 255, 0)
    assert out.images.min() >= -1 and out.images.max() <= 1


def test_same_size_kept(tmp_path):
    for i in range(3):
        _save(_rgb(12, 7, (i, i, i)), tmp_path / f"{i}.png")
    out, _ = _load(tmp_path)
    assert out.images.shape == (3, 3, 7, 12)
    assert [p.name for p in out.paths] == ["0.png", "1.png", "2.png"]


def test_bad_resolution_is_config_error(tmp_path):
    _save(_rgb(), tmp_path / "a.png")
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="resolution"):
            load_image_folder(tmp_path, resolution=bad)


def test_default_warn_uses_warnings(tmp_path):
    _save(Image.new("L", (4, 4), 0), tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("x")
    with pytest.warns(UserWarning) as rec:
        load_image_folder(tmp_path)
    texts = [str(w.message) for w in rec]
    assert any(t.startswith("skipped 1 of 2 files") for t in texts)
    assert any(t.startswith("converted 1 of 1 images") for t in texts)


# --------------------------------------------------------------------------------------
# fuzz
# --------------------------------------------------------------------------------------

_EXTS = [".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".txt", ".bin", ""]
_SAVE_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["L", "RGB", "RGBA", "CMYK", "I;16", "F"],
    "WEBP": ["RGB", "RGBA"],
}


def _random_image(fmt: str, mode: str, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        raw = rng.integers(0, 256, (h, w * bands), dtype=np.uint8).tobytes()
        img = Image.frombytes("L", (w * bands, h), raw)
        img = Image.frombytes(mode, (w, h), img.tobytes()) if mode != "1" else img.convert("1").resize((w, h))
        if mode == "P":
            img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return _bytes(img, fmt)


@st.composite
def _file_contents(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "image", "truncated", "flipped"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=300))
    fmt = draw(st.sampled_from(sorted(_SAVE_MODES)))
    mode = draw(st.sampled_from(_SAVE_MODES[fmt]))
    w = draw(st.integers(1, 12))
    h = draw(st.integers(1, 12))
    data = _random_image(fmt, mode, w, h, draw(st.integers(0, 2**16)))
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flipped":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        return bytes(buf)
    return data


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only when something hangs
    raise _Timeout("load_image_folder took longer than 5 s on one example")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(st.tuples(_file_contents(), st.sampled_from(_EXTS)), min_size=1, max_size=5),
    resolution=st.sampled_from([None, 8]),
)
def test_fuzz_never_crashes(files, resolution):
    with tempfile.TemporaryDirectory() as d:
        folder = pathlib.Path(d)
        for i, (data, ext) in enumerate(files):
            (folder / f"f{i}{ext}").write_bytes(data)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        t0 = time.monotonic()
        try:
            out = load_image_folder(folder, resolution=resolution, max_pixels=1_000_000, warn=lambda m: None)
        except InputError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            assert time.monotonic() - t0 < 5
        assert isinstance(out, ImageSet)
        assert len(out.paths) + len(out.skipped) == len(files)
        assert out.images.shape[0] == len(out.paths) >= 1
        assert out.images.dtype == torch.float32 and out.images.shape[1] == 3
        assert torch.isfinite(out.images).all()
        assert out.images.min() >= -1.0 and out.images.max() <= 1.0
        if resolution is not None:
            assert out.images.shape[2:] == (resolution, resolution)
        assert 0 <= out.converted <= len(out.paths)


def test_input_error_is_diffscrub_error():
    assert issubclass(InputError, DiffscrubError) and InputError.exit_code == 2


def test_pixels_stay_8_bit_and_encode_a_chunk_at_a_time(tmp_path):
    """Decoded images are held as uint8 (a quarter of float32); the float form in [-1, 1] is the
    same numbers, and latents encoded from the pixels a chunk at a time equal latents of the floats."""
    from diffscrub.core.context import LatentCache

    rng = np.random.default_rng(0)
    for i in range(5):
        _save(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)), tmp_path / f"{i}.png")
    (tmp_path / "9bad.png").write_bytes(b"not a png")  # skipped last: no empty row may remain
    out, _ = _load(tmp_path)
    assert out.pixels.dtype == torch.uint8 and out.pixels.shape == (5, 3, 6, 6) and out.hw == (6, 6)
    assert np.array_equal(out.pixels[2].permute(1, 2, 0).numpy(), np.asarray(Image.open(tmp_path / "2.png")))
    floats = out.images
    assert floats.dtype == torch.float32 and float(floats.min()) >= -1 and float(floats.max()) <= 1
    assert torch.allclose(floats, out.pixels.float() / 127.5 - 1)
    assert torch.equal(out.floats(1, 3), floats[1:3])

    seen = []

    class Adapter:  # a linear "VAE": moments = (2x, |x|)
        def encode_moments(self, x):
            seen.append((x.dtype, x.shape[0]))
            return 2 * x, x.abs()

    cache = LatentCache.encode(Adapter(), out.pixels, 2)
    assert seen == [(torch.float32, 2), (torch.float32, 2), (torch.float32, 1)]
    assert torch.allclose(cache.mean, 2 * floats) and torch.allclose(cache.std, floats.abs())
