"""Digits on a canvas: scikit-learn's 8x8 digits, upscaled and pasted on a larger cluttered canvas.

A localization dataset with known ground-truth boxes that ships with a package (no download): each
image holds one digit at a random position and scale, in a random colour, over a noisy background with
random line clutter. Used by the demo, the tests and the experiments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flaxcam._optional import require

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class DigitCanvases:
    """``images`` ``(N, H, W, 3)`` float32 in [0, 1]; ``labels`` ``(N,)``; ``boxes`` ``(N, 4)`` int32
    ``[x0, y0, x1, y1]`` (exclusive end) of the digit's ink on the canvas; ``marked`` ``(N,)`` bool, True
    where a planted marker was drawn (all False without ``marker_class``)."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    marked: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Default ``marked`` to all False."""
        if self.marked is None:
            object.__setattr__(self, "marked", np.zeros(len(self.labels), bool))


#: Corners where a planted marker can be drawn.
MARKER_CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")


def marker_region(size: tuple[int, int], corner: str, marker_size: int, margin: int = 2) -> tuple[slice, slice]:
    """Rows and columns ``(slice, slice)`` of a ``marker_size`` square ``margin`` pixels from ``corner``."""
    if corner not in MARKER_CORNERS:
        raise ValueError(f"unknown marker corner {corner!r}: valid corners are {', '.join(MARKER_CORNERS)}")
    height, width = size
    top = margin if corner.startswith("top") else height - margin - marker_size
    left = margin if corner.endswith("left") else width - margin - marker_size
    return slice(top, top + marker_size), slice(left, left + marker_size)


def draw_marker(
    images: np.ndarray,
    which: np.ndarray | None = None,
    *,
    corner: str = "top_left",
    size: int = 6,
    margin: int = 2,
    colour: Sequence[float] | None = None,
) -> np.ndarray:
    """A copy of float ``images`` ``(N, H, W, 3)`` in [0, 1] with a planted marker on the images that the
    boolean ``which`` ``(N,)`` selects (default: all): a ``size``-pixel square ``margin`` pixels from
    ``corner`` (:func:`marker_region`), a stand-in for a ruler, an ink mark or a sticker.

    ``colour=None`` (default, the marker of :func:`make_digit_canvases`): a white square with a black
    centre, a sticker-like mark that no clutter line or digit imitates; an RGB ``colour``: a solid square
    of that colour.
    """
    out = np.array(images, copy=True)
    height, width = out.shape[1:3]
    if not 1 <= size <= min(height, width) - 2 * margin:
        raise ValueError(
            f"marker size must be in [1, {min(height, width) - 2 * margin}] for images of {(height, width)} "
            f"and a margin of {margin}, got {size}"
        )
    rows, cols = marker_region((height, width), corner, size, margin)
    selected = np.ones(len(out), bool) if which is None else np.asarray(which, bool)
    if colour is not None:
        out[selected, rows, cols] = np.asarray(colour, out.dtype)
        return out
    out[selected, rows, cols] = 1.0
    inner = max(size // 3, 1)
    start = (size - inner) // 2
    centre_rows = slice(rows.start + start, rows.start + start + inner)
    centre_cols = slice(cols.start + start, cols.start + start + inner)
    out[selected, centre_rows, centre_cols] = 0.0
    return out


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    load_digits = require("sklearn.datasets", extra="demo").load_digits

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


def _cluttered_background(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, noise: float, clutter_lines: int
) -> np.ndarray:
    """One ``(H, W, 3)`` canvas without a digit: a random colour, Gaussian noise and ``clutter_lines`` thin lines."""
    height, width = yy.shape
    background = rng.uniform(0.0, 0.35, 3).astype(np.float32)
    canvas = background + noise * rng.standard_normal((height, width, 3)).astype(np.float32)
    for _ in range(clutter_lines):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
        length = max(np.hypot(x1 - x0, y1 - y0), 1e-6)
        distance = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / length
        canvas[distance < 0.8] = rng.uniform(0.3, 0.8, 3)
    return canvas


def make_background_canvases(
    count: int, *, size: tuple[int, int] = (96, 96), clutter_lines: int = 3, noise: float = 0.08, seed: int = 0
) -> np.ndarray:
    """``count`` canvases ``(N, H, W, 3)`` float32 in [0, 1] drawn like :func:`make_digit_canvases`'
    (same background colours, noise and clutter lines) but with no digit: the negatives of a
    "background" class, so that a classifier has a reason to respond to the digit's ink as a whole."""
    height, width = size
    rng = np.random.default_rng([seed, 2])  # a stream of its own: never the same draws as the digit canvases
    yy, xx = np.mgrid[0:height, 0:width]
    images = np.empty((count, height, width, 3), np.float32)
    for i in range(count):
        images[i] = np.clip(_cluttered_background(rng, yy, xx, noise, clutter_lines), 0.0, 1.0)
    return images


def make_digit_canvases(
    count: int,
    *,
    size: tuple[int, int] = (96, 96),
    digit_size: tuple[int, int] = (24, 48),
    clutter_lines: int = 3,
    noise: float = 0.08,
    seed: int = 0,
    classes: tuple[int, ...] | None = None,
    marker_class: int | None = None,
    marker_fraction: float = 0.9,
    marker_corner: str = "top_left",
    marker_size: int = 6,
) -> DigitCanvases:
    """Generate ``count`` canvases of ``size`` (height, width) with one digit each.

    Args:
      digit_size: range of the digit's side in pixels (drawn uniformly).
      clutter_lines: random thin lines per image (distractors with no class information).
      noise: standard deviation of the background noise.
      classes: restrict to these digit classes (default: all ten).
      marker_class: plant a shortcut: draw a marker (a ``marker_size`` white square with a black centre,
        2 px from ``marker_corner``, drawn over the digit) on a random ``marker_fraction`` of the images
        of this class. ``None`` (default): no marker. The images, labels and boxes are the same as without
        a marker for the same seed; ``DigitCanvases.marked`` says which images carry it.
      marker_fraction: fraction in [0, 1] of ``marker_class``'s images that get the marker.
      marker_corner: one of ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``.
    """
    height, width = size
    if digit_size[1] > min(height, width):
        raise ValueError(f"digit_size {digit_size} does not fit a canvas of size {size}")
    if marker_class is not None:
        if not 0.0 <= marker_fraction <= 1.0:
            raise ValueError(f"marker_fraction must be in [0, 1], got {marker_fraction}")
        if not 1 <= marker_size <= min(height, width) - 4:
            raise ValueError(
                f"marker_size must be in [1, {min(height, width) - 4}] for a canvas of {size}, got {marker_size}"
            )
        marker_region(size, marker_corner, marker_size)  # an unknown corner fails before any work
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
        canvas = _cluttered_background(rng, yy, xx, noise, clutter_lines)
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
    labels = targets[picks]
    marked = np.zeros(count, bool)
    if marker_class is not None:
        # A separate random stream, so a marked set differs from its clean twin only by the markers.
        candidates = np.flatnonzero(labels == marker_class)
        chosen = np.random.default_rng([seed, 1]).permutation(candidates)[: round(marker_fraction * len(candidates))]
        marked[chosen] = True
        images = draw_marker(images, marked, corner=marker_corner, size=marker_size)
    return DigitCanvases(images=images, labels=labels, boxes=boxes, marked=marked)
