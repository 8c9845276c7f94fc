"""Bad and odd image files: converted to RGB (checked against float64 formulas) or recorded with a reason;
one bad file never stops iteration. Every file is generated here."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flaxcam.data import ImageFolderSource, iterate_batches
from flaxcam.imageio import (
    ImageReadError,
    Preprocessing,
    read_image,
    read_image_with_size,
)

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (10, 14, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (10, 14), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (10, 14), dtype=np.uint8)
DEEP = RNG.integers(256, 65536, (10, 14), dtype=np.uint16)  # 16-bit values above 255


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 8-bit gray pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def rgb48_png(path, array: np.ndarray):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
    return path


DEEP_RGB = RNG.integers(0, 65536, (10, 14, 3), dtype=np.uint16)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _expected_gray():
    return np.repeat(GRAY[..., None], 3, -1)


# name → (writer(path), expected RGB array or None for "readable, content not checked exactly")
CONVERTED = {
    "gray.png": (lambda p: _save(Image.fromarray(GRAY), p), _expected_gray),
    "bilevel.png": (
        lambda p: _save(Image.fromarray(GRAY > 127), p),
        lambda: np.repeat(((GRAY > 127) * 255).astype(np.uint8)[..., None], 3, -1),
    ),
    "gray_alpha.png": (
        lambda p: _save(Image.fromarray(np.stack([GRAY, ALPHA], -1), mode="LA"), p),
        lambda: np.repeat(np.rint(GRAY * (ALPHA / 255.0)).astype(np.uint8)[..., None], 3, -1),
    ),
    "rgba.png": (
        lambda p: _save(Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA"), p),
        lambda: np.rint(RGB * (ALPHA[..., None] / 255.0)).astype(np.uint8),
    ),
    "deep16.png": (
        lambda p: _save(Image.fromarray(DEEP), p),
        lambda: np.repeat(np.rint(DEEP * (255.0 / 65535.0)).astype(np.uint8)[..., None], 3, -1),
    ),
    "deep48_rgb.png": (lambda p: rgb48_png(p, DEEP_RGB), lambda: (DEEP_RGB >> 8).astype(np.uint8)),
    "palette.png": (
        lambda p: _save(Image.fromarray(RGB).quantize(16), p),
        lambda: np.asarray(Image.fromarray(RGB).quantize(16).convert("RGB")),
    ),
    "palette_transparent.png": (
        lambda p: _save(Image.fromarray(RGB).quantize(16), p, transparency=0),
        lambda: np.where(
            (np.asarray(Image.fromarray(RGB).quantize(16)) == 0)[..., None],
            0,
            np.asarray(Image.fromarray(RGB).quantize(16).convert("RGB")),
        ).astype(np.uint8),
    ),
    "float.tiff": (
        lambda p: _save(Image.fromarray((GRAY / 255.0).astype(np.float32), mode="F"), p),
        _expected_gray,
    ),
    "tiny_1x1.png": (lambda p: _save(Image.fromarray(RGB[:1, :1]), p), lambda: RGB[:1, :1]),
    "cmyk.jpg": (lambda p: _save(Image.fromarray(RGB).convert("CMYK"), p, quality=95), None),
    "rgb.bmp": (lambda p: _save(Image.fromarray(RGB), p), lambda: RGB),
}


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_odd_formats_are_converted(tmp_path, name):
    writer, expected = CONVERTED[name]
    path = writer(tmp_path / name)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if expected is None:  # CMYK JPEG: lossy; the RGB round trip must stay close to the original
        assert image.shape == RGB.shape and np.abs(image.astype(int) - RGB).mean() < 12
    else:
        np.testing.assert_array_equal(image, expected())


def _truncated_jpeg(path):
    full = tmp = path.with_suffix(".full")
    Image.fromarray(np.repeat(np.repeat(RGB, 8, 0), 8, 1)).save(tmp, format="JPEG")
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])


def _truncated_png(path):
    Image.fromarray(np.repeat(np.repeat(RGB, 8, 0), 8, 1)).save(path)
    path.write_bytes(path.read_bytes()[:200])


RECORDED = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "not a readable image file"),
    "garbage.png": (
        lambda p: p.write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes()),
        "not a readable image file",
    ),
    "text.jpg": (lambda p: p.write_text("hello"), "not a readable image file"),
    "truncated.jpg": (_truncated_jpeg, "cannot decode image"),
    "truncated.png": (_truncated_png, "cannot decode image"),
    "bomb.png": (lambda p: p.write_bytes(bomb_png(30000, 30000)), "decompression bomb"),
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_unreadable_files_raise_a_clear_error(tmp_path, name):
    writer, reason = RECORDED[name]
    path = tmp_path / name
    writer(path)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert name in str(info.value)


def test_size_guard_reduces_jpegs_and_refuses_other_formats(tmp_path):
    big = np.repeat(np.repeat(RGB, 60, 0), 60, 1)  # 600 x 840
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "big.png")
    reduced = read_image(tmp_path / "big.jpg", max_pixels=100_000)
    assert reduced.shape[0] * reduced.shape[1] <= 100_000 and reduced.shape == (150, 210, 3)
    # Decoded at 1/4 scale: close to the 4x4 block means of the original.
    blocks = big.reshape(150, 4, 210, 4, 3).mean(axis=(1, 3))
    assert np.abs(reduced - blocks).mean() < 10
    assert read_image(tmp_path / "big.jpg").shape == big.shape  # default limit: full size
    image, size = read_image_with_size(tmp_path / "big.jpg", max_pixels=100_000)
    assert image.shape == (150, 210, 3) and size == (600, 840)
    with pytest.raises(ImageReadError, match="exceeds the limit of 100000 pixels"):
        read_image(tmp_path / "big.png", max_pixels=100_000)


def test_one_folder_with_every_kind_iterates_to_the_end(tmp_path):
    """Every converted and unreadable kind in one class folder: the good ones come out as inputs,
    each bad one is reported once in ``Batch.errors`` with its reason, nothing raises."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, (writer, _) in CONVERTED.items():
        writer(folder / name)
    for name, (writer, _) in RECORDED.items():
        writer(folder / name)
    source = ImageFolderSource(tmp_path)
    batches = list(iterate_batches(source, Preprocessing((16, 16)), 5))
    errors = {error_id: reason for b in batches for _, error_id, reason in b.errors}
    assert set(errors) == {f"mixed/{name}" for name in RECORDED}
    for name, (_, reason) in RECORDED.items():
        assert reason in errors[f"mixed/{name}"]
    valid_ids = {i for b in batches for i, ok in zip(b.ids, b.valid) if ok}
    assert valid_ids == {f"mixed/{name}" for name in CONVERTED}
    assert sum(len(b.ids) - b.ids.count("") for b in batches) == len(CONVERTED) + len(RECORDED)
    assert all(np.isfinite(b.images).all() for b in batches)
    # With max_pixels=100 only the 1x1 image fits and the 10x14 JPEG is decoded at 1/2 scale; every
    # other 10x14 file is refused with the size guard's reason.
    source = ImageFolderSource(tmp_path, max_pixels=100)
    batches = list(iterate_batches(source, Preprocessing((16, 16)), 5))
    errors = {error_id: reason for b in batches for _, error_id, reason in b.errors}
    valid_ids = {i for b in batches for i, ok in zip(b.ids, b.valid) if ok}
    assert valid_ids == {"mixed/tiny_1x1.png", "mixed/cmyk.jpg"}
    assert "exceeds the limit of 100 pixels" in errors["mixed/rgb.bmp"]
    assert set(errors) | valid_ids == set(source.ids)
