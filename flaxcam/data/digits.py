"""Digits on a canvas: scikit-learn's 8x8 digits, upscaled and pasted on a larger cluttered canvas.

A localization dataset with known ground-truth boxes that ships with a package (no download): each
image holds one digit at a random position and scale, in a random colour, over a noisy background with
random line clutter. Used by the demo, the tests and the experiments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class DigitCanvases:
    """``images`` ``(N, H, W, 3)`` float32 in [0, 1]; ``labels`` ``(N,)``; ``boxes`` ``(N, 4)`` int32
    ``[x0, y0, x1, y1]`` (exclusive end) of the digit's ink on the canvas."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int32)


def _upscale(glyph: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upscaling of an 8x8 glyph to ``size x size`` (pure NumPy)."""
    coords = (np.arange(size) + 0.5) * glyph.shape[0] / size - 0.5
    coords = np.clip(coords, 0, glyph.shape[0] - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, glyph.shape[0] - 1)
    frac = coords - low
    rows = glyph[low] * (1 - frac)[:, None] + glyph[high] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, high] * frac[None, :]


def make_digit_canvases(
    count: int,
    *,
    size: tuple[int, int] = (96, 96),
    digit_size: tuple[int, int] = (24, 48),
    clutter_lines: int = 3,
    noise: float = 0.08,
    seed: int = 0,
    classes: tuple[int, ...] | None = None,
) -> DigitCanvases:
    """Generate ``count`` canvases of ``size`` (height, width) with one digit each.

    Args:
      digit_size: range of the digit's side in pixels (drawn uniformly).
      clutter_lines: random thin lines per image (distractors with no class information).
      noise: standard deviation of the background noise.
      classes: restrict to these digit classes (default: all ten).
    """
    height, width = size
    if digit_size[1] > min(height, width):
        raise ValueError(f"digit_size {digit_size} does not fit a canvas of size {size}")
    rng = np.random.default_rng(seed)
    glyphs, targets = _load_digits()
    if classes is not None:
        keep = np.isin(targets, classes)
        glyphs, targets = glyphs[keep], targets[keep]
    picks = rng.integers(0, len(glyphs), count)
    images = np.empty((count, height, width, 3), np.float32)
    boxes = np.empty((count, 4), np.int32)
    yy, xx = np.mgrid[0:height, 0:width]
    for i, pick in enumerate(picks):
        background = rng.uniform(0.0, 0.35, 3).astype(np.float32)
        canvas = background + noise * rng.standard_normal((height, width, 3)).astype(np.float32)
        for _ in range(clutter_lines):
            x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
            length = max(np.hypot(x1 - x0, y1 - y0), 1e-6)
            distance = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / length
            canvas[distance < 0.8] = rng.uniform(0.3, 0.8, 3)
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        ink = _upscale(glyphs[pick], side)
        colour = rng.uniform(0.6, 1.0, 3).astype(np.float32)
        region = canvas[top : top + side, left : left + side]
        canvas[top : top + side, left : left + side] = region * (1 - ink[..., None]) + colour * ink[..., None]
        rows, cols = np.nonzero(ink > 0.25)
        boxes[i] = [left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1]
        images[i] = np.clip(canvas, 0.0, 1.0)
    return DigitCanvases(images=images, labels=targets[picks], boxes=boxes)
