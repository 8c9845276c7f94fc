"""Reading image files into RGB arrays and preprocessing them for a model (host side, NumPy + Pillow)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and the reason."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` as an ``(H, W, 3)`` uint8 RGB array.

    Grayscale, palette, RGBA (composited on black), CMYK and 16-bit images are converted to 8-bit RGB.
    Raises :class:`ImageReadError` for a missing, unreadable or truncated file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if array.max() > 255 else 255.0
                image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
            rgb = image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image file") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from None


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw RGB images become model inputs: resize to ``size`` (H, W), scale to [0, 1], then
    ``(x - mean) / std`` per channel."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``(h, w, 3)`` uint8 → ``(H, W, 3)`` float32 in [0, 1] (bilinear, Pillow)."""
        height, width = self.size
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        return image.astype(np.float32) / 255.0

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """``[0, 1]`` images → model inputs."""
        return ((images - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Batch of uint8 images → ``(resized [0, 1] images, model inputs)``."""
        resized = np.stack([self.resize(image) for image in images])
        return resized, self.normalize(resized)
