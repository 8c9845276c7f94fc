"""Per-image attention statistics of class activation maps, computed on device in one jitted call.

For a map ``m`` (non-negative, e.g. a min-max normalized CAM at the input resolution, ``H × W``) the
*energy* of a region ``R`` is its share of the map's total mass, ``share(R) = Σ_R m / Σ m`` (NaN for an
all-zero map). The regions are fractions of the image, so the statistics do not depend on the input size:

* ``border_share``: the band of width ``border · H`` (rows) and ``border · W`` (columns) along the edges;
* ``corner_{tl,tr,bl,br}_share``: the ``corner · H × corner · W`` rectangle in each corner
  (a uniform map gives ``corner²`` in each);
* ``gt_share``: inside the ground-truth box ``[x0, y0, x1, y1]`` (pixel centres in ``[x0, x1) × [y0, y1)``)
  or mask, when given;
* ``entropy``: ``-Σ p log p / log(H W)`` with ``p = m / Σ m`` (1 for a uniform map, 0 for a single pixel);
* ``peak_y, peak_x``: the argmax pixel's centre as a fraction of the height / width (first maximum in
  raster order); ``com_y, com_x``: the centre of mass, same units.

The box is the CAM paper's 20% rule (:func:`flaxcam.localize.boxes`): the bounding box of the largest
connected region of pixels ``>= threshold · max(m)``.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam import localize, ops

Array = jax.Array

#: Default width of the border band and side of the corner squares, as fractions of the image size.
DEFAULT_BORDER = 0.1
DEFAULT_CORNER = 0.2

#: Order of the corner statistics.
CORNERS = ("tl", "tr", "bl", "br")


def _band_pixels(fraction: float, size: int) -> int:
    return max(1, round(fraction * size))


def region_masks(height: int, width: int, border: float, corner: float) -> dict[str, Array]:
    """Boolean ``(H, W)`` masks of the border band and the four corner rectangles."""
    if not 0 < border < 0.5 or not 0 < corner <= 0.5:
        raise ValueError(f"border must be in (0, 0.5) and corner in (0, 0.5], got border={border}, corner={corner}")
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    bh, bw = _band_pixels(border, height), _band_pixels(border, width)
    ch, cw = _band_pixels(corner, height), _band_pixels(corner, width)
    top, bottom = rows < ch, rows >= height - ch
    left, right = cols < cw, cols >= width - cw
    return {
        "border": (rows < bh) | (rows >= height - bh) | (cols < bw) | (cols >= width - bw),
        "tl": top & left,
        "tr": top & right,
        "bl": bottom & left,
        "br": bottom & right,
    }


def _box_mask(box: Array, height: int, width: int) -> Array:
    """``(H, W)`` mask of the pixels whose centre lies in the box ``[x0, y0, x1, y1]``, i.e. in
    ``[x0, x1) × [y0, y1)`` (all False for NaN)."""
    y = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
    x = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def _one_map(m: Array, gt_box: Array, gt_mask: Array | None, regions: dict[str, Array]) -> dict[str, Array]:
    height, width = m.shape
    m = jnp.maximum(m.astype(jnp.float32), 0.0)
    total = jnp.sum(m)
    safe_total = jnp.where(total > 0, total, 1.0)
    nan = jnp.float32(jnp.nan)

    def share(region: Array) -> Array:
        return jnp.where(total > 0, jnp.sum(jnp.where(region, m, 0.0)) / safe_total, nan)

    out = {"border_share": share(regions["border"])}
    for name in CORNERS:
        out[f"corner_{name}_share"] = share(regions[name])
    has_box = jnp.all(jnp.isfinite(gt_box))
    box_region = _box_mask(jnp.where(has_box, gt_box, 0.0), height, width)
    if gt_mask is None:
        out["gt_share"] = jnp.where(has_box, share(box_region), nan)
    else:
        has_mask = jnp.any(gt_mask)
        region = jnp.where(has_mask, gt_mask, box_region)
        out["gt_share"] = jnp.where(has_mask | has_box, share(region), nan)
    p = m / safe_total
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)) / jnp.log(float(height * width))
    out["entropy"] = jnp.where(total > 0, entropy, nan)
    flat_peak = jnp.argmax(m.reshape(-1))
    out["peak_y"] = ((flat_peak // width).astype(jnp.float32) + 0.5) / height
    out["peak_x"] = ((flat_peak % width).astype(jnp.float32) + 0.5) / width
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    out["com_y"] = jnp.where(total > 0, jnp.sum(p.sum(axis=1) * ys), nan)
    out["com_x"] = jnp.where(total > 0, jnp.sum(p.sum(axis=0) * xs), nan)
    return out


def attention_stats(
    maps: Array,
    gt_boxes: Array | None = None,
    gt_masks: Array | None = None,
    *,
    border: float = DEFAULT_BORDER,
    corner: float = DEFAULT_CORNER,
) -> dict[str, Array]:
    """Attention statistics of ``(B, H, W)`` maps (see the module docstring); jittable and vmapped.

    Args:
      maps: ``(B, H, W)`` non-negative maps (negative values are clipped to 0).
      gt_boxes: ``(B, 4)`` ground-truth boxes ``[x0, y0, x1, y1]`` in the maps' pixels (exclusive end),
        rows of NaN where absent.
      gt_masks: ``(B, H, W)`` bool ground-truth masks (an all-False mask falls back to the box).
      border, corner: band width and corner side as fractions of the map size.

    Returns:
      A dict of ``(B,)`` float32 arrays: ``border_share``, ``corner_tl_share`` … ``corner_br_share``,
      ``gt_share`` (NaN without ground truth), ``entropy``, ``peak_y``, ``peak_x``, ``com_y``, ``com_x``.
    """
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (batch, height, width), got {maps.shape}")
    if gt_boxes is not None and np.shape(gt_boxes) != (maps.shape[0], 4):
        raise ValueError(
            f"gt_boxes must have shape ({maps.shape[0]}, 4), one [x0, y0, x1, y1] row per map, got {np.shape(gt_boxes)}"
        )
    region_masks(1, 1, border, corner)  # validate the fractions eagerly, with a clear error
    return _attention_stats(maps, gt_boxes, gt_masks, border=float(border), corner=float(corner))


@functools.partial(jax.jit, static_argnames=("border", "corner"))
def _attention_stats(maps: Array, gt_boxes: Array | None, gt_masks: Array | None, *, border: float, corner: float):
    batch, height, width = maps.shape
    regions = region_masks(height, width, border, corner)
    if gt_boxes is None:
        gt_boxes = jnp.full((batch, 4), jnp.nan, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    if gt_masks is None:
        return jax.vmap(lambda m, b: _one_map(m, b, None, regions))(maps, gt_boxes)
    return jax.vmap(lambda m, b, k: _one_map(m, b, k, regions))(maps, gt_boxes, jnp.asarray(gt_masks, bool))


def box_grid(input_size: tuple[int, int], box_resolution: int | None) -> tuple[int, int]:
    """Size of the map the box is computed on: the input size, scaled down so that its longer side is at
    most ``box_resolution`` (``None``: the input size, exact)."""
    height, width = input_size
    if box_resolution is None or max(height, width) <= box_resolution:
        return height, width
    scale = box_resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def boxes_from_low_res(low_res: Array, input_size: tuple[int, int], grid: tuple[int, int], threshold) -> Array:
    """The 20%-rule box ``[x0, y0, x1, y1]`` in input pixels, computed on the map upsampled to ``grid``
    (bilinear + min-max, as the explain step does at the input size) and scaled to the input size
    (start rounded down, end rounded up, so the box covers the region found)."""
    maps = ops.minmax_normalize(ops.resize_maps(low_res, grid))
    box = localize.boxes(maps, threshold)
    if grid == tuple(input_size):
        return box
    sy, sx = input_size[0] / grid[0], input_size[1] / grid[1]
    scale = jnp.array([sx, sy, sx, sy], jnp.float32)
    scaled = box.astype(jnp.float32) * scale
    rounded = jnp.concatenate([jnp.floor(scaled[..., :2] + 1e-4), jnp.ceil(scaled[..., 2:] - 1e-4)], axis=-1)
    return rounded.astype(jnp.int32)


def foreground_on_grid(maps: Array, low_res: Array, grid: tuple[int, int], threshold, rule: str = "paper") -> Array:
    """The box rule's foreground ``m >= cut`` (:func:`flaxcam.localize.rule_cuts`; the 20% rule's cut is
    ``threshold · max(m)``), and ``max(m) > 0``, of each map on ``grid``: ``maps`` itself when ``grid`` is
    its size, else ``low_res`` upsampled to ``grid`` (bilinear + min-max)."""
    native = cast(tuple[int, int], tuple((maps if low_res is None else low_res).shape[-2:]))
    if grid != tuple(maps.shape[-2:]):
        maps = ops.minmax_normalize(ops.resize_maps(low_res, grid))
    peak = jnp.max(maps, axis=(-2, -1), keepdims=True)
    cuts = localize.rule_cuts(maps, rule, threshold=threshold, map_shape=native)
    return (maps >= cuts[..., None, None]) & (peak > 0)


def largest_component_boxes(foreground: np.ndarray) -> np.ndarray:
    """Host version of :func:`flaxcam.localize.boxes` on boolean masks ``(B, h, w)``: the bounding box
    ``[x0, y0, x1, y1]`` (exclusive end) of each mask's largest 8-connected component, ties to the one
    whose first pixel comes first in raster order, ``[0, 0, 0, 0]`` for an empty mask.

    One ``scipy.ndimage.label`` call labels the whole stack (the structuring element does not connect
    neighbouring masks); on CPU this is ~20× cheaper than the iterative labelling on device, and on an
    accelerator it runs on the host, overlapped with the next batch."""
    from scipy import ndimage

    foreground = np.asarray(foreground, bool)
    count = foreground.shape[0]
    out = np.zeros((count, 4), np.int32)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, total = ndimage.label(foreground, structure=structure)
    if total == 0:
        return out
    sizes = np.bincount(labels.reshape(-1), minlength=total + 1)[1:]
    slices = ndimage.find_objects(labels)
    image_of = np.array([found[0].start for found in slices])
    numbers = np.arange(total)
    order = np.lexsort((numbers, -sizes, image_of))  # by image, then size descending, then label (raster order)
    first = order[np.r_[True, image_of[order][1:] != image_of[order][:-1]]]
    for label in first:
        _, rows, cols = slices[label]
        out[image_of[label]] = (cols.start, rows.start, cols.stop, rows.stop)
    return out


def scale_boxes(boxes: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """``[x0, y0, x1, y1]`` boxes on ``grid`` → input pixels (start rounded down, end rounded up)."""
    if tuple(grid) == tuple(input_size):
        return np.asarray(boxes, np.int32)
    sy, sx = input_size[0] / grid[0], input_size[1] / grid[1]
    scaled = np.asarray(boxes, np.float64) * np.array([sx, sy, sx, sy])
    return np.concatenate([np.floor(scaled[:, :2] + 1e-4), np.ceil(scaled[:, 2:] - 1e-4)], axis=1).astype(np.int32)


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``[x0, y0, x1, y1]`` boxes (NumPy; :func:`flaxcam.localize.box_iou`'s formula), NaN where
    ``b`` has NaN (no ground truth)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda box: np.clip(box[:, 2] - box[:, 0], 0, None) * np.clip(box[:, 3] - box[:, 1], 0, None)
    union = area(a) + area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return np.where(np.isnan(b).any(axis=1), np.nan, iou).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("top_k", "border", "corner", "with_masks", "box_resolution", "box_rule"))
def summarize(
    maps: Array,
    low_res: Array,
    probabilities: Array,
    targets: Array,
    gt_boxes: Array,
    gt_masks: Array | None,
    threshold: float,
    *,
    top_k: int,
    border: float,
    corner: float,
    with_masks: bool,
    box_resolution: int | None = None,
    box_rule: str = "paper",
) -> dict[str, Array]:
    """Everything the audit computes on device for a batch, in one call: top-k classes and probabilities,
    the prediction, the target's probability, the 20% rule's foreground ``box_mask`` on the box grid
    (its largest component's box is found on the host: :func:`largest_component_boxes`), the attention
    statistics and the low-resolution map in float16.

    ``maps`` ``(B, H, W)`` and ``low_res`` ``(B, h, w)`` are the maps of the explained target ``targets``
    ``(B,)``; ``probabilities`` ``(B, K)``; ``gt_boxes`` ``(B, 4)`` ``[x0, y0, x1, y1]`` or NaN.
    ``box_resolution``: see :func:`box_grid` (a box grid of at most 64 px per side keeps the mask
    transfer and the labelling small at any input size).
    """
    top_probs, top_classes = jax.lax.top_k(probabilities, top_k)
    height, width = maps.shape[1:]
    input_size = (height, width)
    grid = box_grid(input_size, box_resolution)
    out = _attention_stats(maps, gt_boxes, gt_masks if with_masks else None, border=border, corner=corner)
    out.update(
        topk_classes=top_classes.astype(jnp.int32),
        topk_probs=top_probs,
        pred=top_classes[:, 0].astype(jnp.int32),
        prob=top_probs[:, 0],
        target=targets.astype(jnp.int32),
        target_prob=jnp.take_along_axis(probabilities, targets[:, None].astype(jnp.int32), axis=1)[:, 0],
        box_mask=foreground_on_grid(maps, low_res, grid, threshold, box_rule),
        low_res=low_res.astype(jnp.float16),
    )
    return out
