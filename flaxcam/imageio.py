"""Reading image files into RGB arrays and preprocessing them for a model (host side, NumPy + Pillow)."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: EXIF tag of the orientation (1: as stored; 2-8: mirrored and / or rotated; 5-8 swap width and height).
EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and the reason."""


def read_image(
    path: str | os.PathLike, *, max_pixels: int | None = None, draft_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read ``path`` as an ``(H, W, 3)`` uint8 RGB array (see :func:`read_image_with_size`)."""
    return read_image_with_size(path, max_pixels=max_pixels, draft_size=draft_size)[0]


def read_image_bytes(
    data: bytes, *, name: str = "<bytes>", max_pixels: int | None = None, draft_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode an encoded image (the bytes of a PNG, JPEG, ... file) exactly as :func:`read_image` reads
    a file; ``name`` stands for the file in error messages."""
    return read_image_with_size(io.BytesIO(data), max_pixels=max_pixels, draft_size=draft_size, name=name)[0]


def oriented(image: Image.Image) -> Image.Image:
    """``image`` turned upright as its EXIF orientation tag says (a camera held sideways stores the
    pixels unrotated with Orientation 6 or 8); the image itself when it has no such tag or it is 1."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def read_image_with_size(
    path: str | os.PathLike | IO[bytes],
    *,
    max_pixels: int | None = None,
    draft_size: tuple[int, int] | None = None,
    name: str | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read ``path`` as an ``(H, W, 3)`` uint8 RGB array; also return the ``(height, width)`` stored in
    the file (larger than the array's when a JPEG was decoded at reduced scale), both in the upright
    frame.

    Every image that flaxcam reads from a file (the command line, every data source, the audit report)
    comes through here. The EXIF orientation is applied (:func:`oriented`, Pillow's
    ``ImageOps.exif_transpose``): a JPEG from a phone held upright, stored sideways with Orientation 6,
    is explained, boxed and shown upright, and its size is the rotated one.

    Conversions: grayscale, bilevel, palette, CMYK, YCbCr and LAB images become RGB; images with an
    alpha channel (RGBA, LA, palette with transparency) are composited on black (``rgb * alpha / 255``);
    16-bit and 32-bit integer images are scaled to 8 bits (by 65535 when any value exceeds 255, else
    taken as 8-bit values; 48-bit RGB PNGs keep their high byte, as Pillow reads them); float images
    (mode F) are scaled by 255 when their maximum is at most 1, else taken as 8-bit values and clipped;
    a float image with a NaN or infinite pixel is refused. Multi-frame files give their first frame.

    Size guard: an image with more than ``max_pixels`` pixels (default: Pillow's
    ``Image.MAX_IMAGE_PIXELS``, about 89 million) is not decoded at full size. A JPEG is decoded at a
    reduced scale (``Image.draft``, 1/2 to 1/8) that fits the limit; any other format raises. Pillow
    itself refuses files above twice its limit (a decompression bomb) before anything is decoded.

    Fast path: with ``draft_size`` ``(height, width)``, a JPEG is decoded at the largest reduction
    (1/2, 1/4, 1/8) that still covers ``draft_size`` in both dimensions (for 450x600 to 224x224: 1/2,
    about twice as fast as a full decode). The result then differs slightly from a full decode
    followed by resizing (measured: 0.4 gray levels on average for 450x600 → 224x224); other formats
    are unaffected.

    Raises :class:`ImageReadError` for a missing, unreadable, truncated or oversized file.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    source, path = path, path if name is None else name  # error messages name the file (or ``name``)
    try:
        with Image.open(source) as image:
            file_size = (image.height, image.width)
            pixels = image.width * image.height
            if limit is not None and pixels > limit:
                if image.format != "JPEG":
                    raise ImageReadError(
                        f"{path}: image of {image.width}x{image.height} = {pixels} pixels exceeds the limit of "
                        f"{limit} pixels (decompression-bomb guard; only JPEGs are decoded at reduced scale)"
                    )
                # JPEG decoders scale by 1/2, 1/4 or 1/8: the smallest such reduction that fits.
                scale = next((s for s in (2, 4, 8) if -(-image.width // s) * -(-image.height // s) <= limit), 8)
                image.draft("RGB", (-(-image.width // scale), -(-image.height // scale)))
                if image.width * image.height > limit:
                    raise ImageReadError(
                        f"{path}: JPEG of {pixels} pixels cannot be reduced below the limit of {limit} pixels "
                        "(decompression-bomb guard)"
                    )
            elif draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (int(draft_size[1]), int(draft_size[0])))
            image.load()
            upright = oriented(image)
            if upright is not image and upright.size != image.size:  # rotated by 90 degrees
                file_size = file_size[::-1]
            return pil_to_rgb(upright), file_size
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image file (unknown format or empty)") from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from None


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image of any mode → ``(H, W, 3)`` uint8 RGB (conversions as in :func:`read_image`)."""
    if (image.mode == "P" and "transparency" in image.info) or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(f"float image with {bad} NaN or infinite pixel(s)")
        return as_rgb_uint8(np.clip(values if values.max(initial=0.0) <= 1.0 else values / 255.0, 0.0, 1.0))
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "RGBA", "LA", "L", "1"):
        return as_rgb_uint8(np.asarray(image))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def as_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Any image array → ``(H, W, 3)`` uint8 RGB.

    Accepts ``(H, W)``, ``(H, W, 1)`` (gray), ``(H, W, 2)`` (gray + alpha), ``(H, W, 3)`` and
    ``(H, W, 4)`` (RGBA; alpha composited on black). dtypes: uint8; bool (True = 255); uint16 and
    other integers (scaled by 65535 / 255 when any value exceeds 255, else taken as 8-bit values);
    floats in [0, 1] (scaled by 255 and rounded).

    Raises ``ValueError`` for another shape, negative integers, non-finite floats or floats outside
    [0, 1].
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"image array of shape {array.shape}: expected (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4)"
        )
    values: np.ndarray
    low: float
    high: float
    if array.dtype == np.uint8:
        values = array.astype(np.float32)
    elif array.dtype == np.bool_:
        values = array.astype(np.float32) * 255.0
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0:
            raise ValueError(f"integer image with negative values (min {low})")
        values = array.astype(np.float64) * (255.0 / 65535.0 if high > 255 else 1.0)
        if high > 65535:
            raise ValueError(f"integer image with values above 65535 (max {high})")
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("float image with NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise ValueError(f"float image with values outside [0, 1] (min {low:.4g}, max {high:.4g})")
        values = np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        raise ValueError(f"image array of dtype {array.dtype}: expected an integer, bool or float dtype")
    channels = array.shape[-1]
    if channels in (2, 4):
        alpha = values[..., -1:] / 255.0
        values = values[..., :-1] * alpha
    if values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    if array.dtype == np.uint8 and channels == 3:
        return np.ascontiguousarray(array)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw RGB images become model inputs: resize to ``size`` (H, W), scale to [0, 1], then
    ``(x - mean) / std`` per channel."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resize_uint8(self, image: np.ndarray) -> np.ndarray:
        """``(h, w, 3)`` uint8 → ``(H, W, 3)`` uint8 (bilinear, Pillow)."""
        height, width = self.size
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        return image

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``(h, w, 3)`` uint8 → ``(H, W, 3)`` float32 in [0, 1] (bilinear, Pillow)."""
        return self.resize_uint8(image).astype(np.float32) / 255.0

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """``[0, 1]`` images → model inputs."""
        return ((images - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Batch of uint8 images → ``(resized [0, 1] images, model inputs)``."""
        resized = np.stack([self.resize(image) for image in images])
        return resized, self.normalize(resized)
