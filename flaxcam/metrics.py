"""Localization and sanity metrics for class activation maps: batched, jitted, pure JAX.

Every function takes a batch of maps ``(B, H, W)`` (any real values; the CAM methods give [0, 1]) and
returns one value per map, float32 ``(B,)``, so that callers can average, group by class or keep them per
image. Ground-truth boxes are ``[x0, y0, x1, y1]`` in the maps' pixel coordinates with an exclusive end
(the convention of :func:`flaxcam.localize.boxes`; fractional coordinates are allowed). A box with a NaN
coordinate means "no ground truth": the metric is NaN for that row, so ``jnp.nanmean`` skips it.

A pixel ``(y, x)`` is inside a box when its centre is: ``x0 <= x + 0.5 < x1`` and ``y0 <= y + 0.5 < y1``
(for integer boxes: columns ``x0 .. x1 - 1``, the slice ``map[y0:y1, x0:x1]``).

* :func:`box_iou_scores` / :func:`box_hits`: IoU of the CAM paper's 20%-rule box with the ground truth, and
  "localization accuracy" = IoU >= 0.5 (Zhou et al., CVPR 2016, Sec. 4.1; the rule of the ILSVRC
  localization task).
* :func:`pointing_hits`: the pointing game (Zhang et al., "Top-down Neural Attention by Excitation
  Backprop", ECCV 2016): is the map's maximum inside the box (within ``tolerance`` pixels)?
* :func:`energy_in_box`: the energy-based pointing game (Wang et al., "Score-CAM", CVPRW 2020, Sec. 5.2):
  the share of the map's total (non-negative) mass that falls inside the box. With a box that is not an
  object, e.g. an image corner, it is a region-attention score.
* :func:`rank_correlation`: Spearman's rank correlation between two batches of maps (average ranks for
  ties), the similarity measure of the model-randomization sanity check (Adebayo et al., "Sanity Checks
  for Saliency Maps", NeurIPS 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam import localize

Array = jax.Array

__all__ = ["box_hits", "box_iou_scores", "energy_in_box", "pointing_hits", "rank_correlation"]


def _check(maps, boxes) -> tuple[Array, Array]:
    maps = jnp.asarray(maps)
    boxes = jnp.asarray(boxes, jnp.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, H, W), got {maps.shape}")
    if boxes.shape != (maps.shape[0], 4):
        raise ValueError(f"boxes must have shape (B, 4) = ({maps.shape[0]}, 4) as [x0, y0, x1, y1], got {boxes.shape}")
    return maps, boxes


def _missing(boxes: Array) -> Array:
    return jnp.any(jnp.isnan(boxes), axis=-1)


def _inside(boxes: Array, height: int, width: int) -> Array:
    """``(B, H, W)`` bool: pixel centres inside each box."""
    ys = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
    xs = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


@jax.jit
def _box_iou_impl(maps: Array, boxes: Array, threshold) -> Array:
    predicted = localize.boxes(maps, threshold)
    iou = localize.box_iou(predicted, jnp.nan_to_num(boxes))
    return jnp.where(_missing(boxes), jnp.nan, iou)


def box_iou_scores(maps, boxes, threshold: float = localize.DEFAULT_THRESHOLD) -> Array:
    """IoU between the 20%-rule box of each map (:func:`flaxcam.localize.boxes`) and its ground-truth box.

    ``IoU = |P ∩ G| / |P ∪ G|`` with ``P`` the bounding box of the largest connected region where
    ``map >= threshold * max(map)`` (Zhou et al. 2016). Returns float32 ``(B,)``; NaN where the box is missing.
    """
    maps, boxes = _check(maps, boxes)
    return _box_iou_impl(maps, boxes, threshold)


def box_hits(maps, boxes, threshold: float = localize.DEFAULT_THRESHOLD, iou_threshold: float = 0.5) -> Array:
    """Localization accuracy per map: 1.0 when ``IoU(20%-rule box, ground truth) >= iou_threshold``, else 0.0.

    The CAM paper's weakly-supervised localization criterion (Zhou et al., CVPR 2016). Returns float32
    ``(B,)`` (NaN where the box is missing); its ``nanmean`` is the localization accuracy.
    """
    iou = box_iou_scores(maps, boxes, threshold)
    return jnp.where(jnp.isnan(iou), jnp.nan, (iou >= iou_threshold).astype(jnp.float32))


@jax.jit
def _pointing_impl(maps: Array, boxes: Array, tolerance) -> Array:
    batch, _height, width = maps.shape
    peak = jnp.argmax(maps.reshape(batch, -1), axis=1)  # the first maximum in raster order
    py = (peak // width).astype(jnp.float32) + 0.5
    px = (peak % width).astype(jnp.float32) + 0.5
    # Distance from the peak's pixel centre to the box (0 inside); a hit is a distance <= tolerance, with
    # the exclusive end of the box counted as outside when the tolerance is 0.
    dx = jnp.maximum(jnp.maximum(boxes[:, 0] - px, px - boxes[:, 2]), 0.0)
    dy = jnp.maximum(jnp.maximum(boxes[:, 1] - py, py - boxes[:, 3]), 0.0)
    inside = (px >= boxes[:, 0]) & (px < boxes[:, 2]) & (py >= boxes[:, 1]) & (py < boxes[:, 3])
    hit = inside | ((tolerance > 0) & (jnp.hypot(dx, dy) <= tolerance))
    return jnp.where(_missing(boxes), jnp.nan, hit.astype(jnp.float32))


def pointing_hits(maps, boxes, tolerance: float = 0.0) -> Array:
    """Pointing game per map: 1.0 when the map's maximum lies inside the box, else 0.0.

    Zhang et al., "Top-down Neural Attention by Excitation Backprop" (ECCV 2016): a hit when the maximum
    point (the first maximum in raster order, at its pixel centre) is within ``tolerance`` pixels of the
    ground-truth box (the paper uses 15 px on ~224 px images; 0 = strictly inside). Returns float32 ``(B,)``
    (NaN where the box is missing).
    """
    maps, boxes = _check(maps, boxes)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    return _pointing_impl(maps, boxes, tolerance)


@jax.jit
def _energy_impl(maps: Array, boxes: Array) -> Array:
    mass = jnp.maximum(maps.astype(jnp.float32), 0.0)
    inside = _inside(jnp.nan_to_num(boxes), maps.shape[1], maps.shape[2])
    total = mass.sum(axis=(1, 2))
    within = jnp.where(inside, mass, 0.0).sum(axis=(1, 2))
    share = jnp.where(total > 0, within / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.where(_missing(boxes), jnp.nan, share)


def energy_in_box(maps, boxes) -> Array:
    """Energy-based pointing game per map: ``sum(map inside box) / sum(map)``, with negative values clipped.

    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for CNNs" (CVPRW 2020), Sec. 5.2. In
    [0, 1]; a map with no positive mass gives 0. Returns float32 ``(B,)`` (NaN where the box is missing).
    """
    maps, boxes = _check(maps, boxes)
    return _energy_impl(maps, boxes)


def _average_ranks(values: Array) -> Array:
    """0-based ranks of a flat array, ties sharing the mean of their positions (``scipy.stats.rankdata - 1``)."""
    ordered = jnp.sort(values)
    below = jnp.searchsorted(ordered, values, side="left")
    up_to = jnp.searchsorted(ordered, values, side="right")
    return (below + up_to - 1).astype(jnp.float32) / 2.0


def _pearson(a: Array, b: Array) -> Array:
    a = a - a.mean()
    b = b - b.mean()
    denominator = jnp.sqrt((a * a).sum() * (b * b).sum())
    return jnp.where(denominator > 0, (a * b).sum() / jnp.where(denominator > 0, denominator, 1.0), jnp.nan)


@jax.jit
def _rank_correlation_impl(a: Array, b: Array) -> Array:
    flat_a = a.reshape(a.shape[0], -1).astype(jnp.float32)
    flat_b = b.reshape(b.shape[0], -1).astype(jnp.float32)
    return jax.vmap(lambda x, y: _pearson(_average_ranks(x), _average_ranks(y)))(flat_a, flat_b)


def rank_correlation(a, b) -> Array:
    """Spearman's rank correlation between paired maps ``a[i]`` and ``b[i]``, ``(B, ...) -> (B,)``.

    ``rho = pearson(rank(a), rank(b))`` over the pixels, ties receiving the average of their ranks (as
    ``scipy.stats.spearmanr``). NaN when a map is constant (its ranks have no variance). Used by the
    model-parameter randomization test (Adebayo et al., NeurIPS 2018).
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must be batches of maps of the same shape (B, ...), got {a.shape} and {b.shape}")
    return _rank_correlation_impl(a, b)
