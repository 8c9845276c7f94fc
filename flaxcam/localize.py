"""Bounding boxes from class activation maps, on device and batched.

The localization rule is the one of the CAM paper (Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep
Features for Discriminative Localization", CVPR 2016, Sec. 3.1 / weakly-supervised localization): segment
the pixels whose value is at least 20% of the map's maximum, then take the bounding box that covers the
largest connected component of that segmentation.

Everything here is pure JAX (``jit``/``vmap`` friendly, no host round trips, no per-image Python loops).
Connected components are labelled by iterative min-label propagation with pointer jumping inside a
``lax.while_loop``:

* every foreground pixel starts with its own flat index ``y * W + x`` as label, background pixels carry
  the sentinel ``H * W``;
* each iteration takes the minimum label over the 3x3 (8-connectivity) or cross (4-connectivity)
  neighbourhood, restricted to the foreground; the smaller label is also *hooked* onto the root the pixel
  pointed to (``labels[labels[p]] = min(labels[labels[p]], new[p])``, a scatter-min that lets a label
  travel along a whole chain in one step), then labels are pointer-jumped, ``labels = labels[labels]``;
* the loop stops when an iteration changes nothing.

Invariant: a foreground pixel's label is the flat index of a pixel of the same component that is not
after it in raster order (``labels[p] <= p``), so at the fixed point every component carries the flat
index of its first pixel in raster order — the same numbering order as ``scipy.ndimage.label``.

Boxes use pixel coordinates with an exclusive end, ``[x0, y0, x1, y1]``: the box covers columns
``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (width ``x1 - x0``), like Python slices
``map[y0:y1, x0:x1]``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

#: The CAM paper's segmentation threshold, as a fraction of each map's maximum.
DEFAULT_THRESHOLD = 0.2

__all__ = ["DEFAULT_THRESHOLD", "box_area", "box_iou", "boxes", "component_labels"]


def _check_connectivity(connectivity: int) -> int:
    if isinstance(connectivity, bool) or connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8 (pixel neighbourhood), got {connectivity!r}")
    return int(connectivity)


def _neighbourhood_min(labels: jax.Array, sentinel: int, connectivity: int) -> jax.Array:
    """Minimum of ``labels`` (H, W) over each pixel's closed neighbourhood; outside the map counts as ``sentinel``."""
    init = jnp.asarray(sentinel, labels.dtype)
    if connectivity == 8:
        return lax.reduce_window(labels, init, lax.min, (3, 3), (1, 1), ((1, 1), (1, 1)))
    rows = lax.reduce_window(labels, init, lax.min, (1, 3), (1, 1), ((0, 0), (1, 1)))
    cols = lax.reduce_window(labels, init, lax.min, (3, 1), (1, 1), ((1, 1), (0, 0)))
    return jnp.minimum(rows, cols)


def _label_one(mask: jax.Array, connectivity: int) -> jax.Array:
    """Component labels of one boolean mask (H, W): flat index of the component's first pixel, H*W on background."""
    height, width = mask.shape
    size = height * width
    flat_mask = mask.reshape(-1)
    labels0 = jnp.where(flat_mask, jnp.arange(size, dtype=jnp.int32), jnp.int32(size))

    def step(labels):
        # labels: (size + 1,), the last entry is the background sentinel pointing at itself.
        grid = labels[:size].reshape(height, width)
        nbr = _neighbourhood_min(grid, size, connectivity).reshape(-1)
        new = jnp.where(flat_mask, jnp.minimum(labels[:size], nbr), size)
        # Hook: the root the pixel pointed to also takes the smaller label (background entries hook the
        # sentinel onto itself, a no-op).
        hooked = labels.at[:size].set(new).at[labels[:size]].min(new)
        # Pointer jumping (twice: each jump halves the length of every label chain).
        hooked = hooked[hooked]
        return hooked[hooked]

    def cond(state):
        _, changed = state
        return changed

    def body(state):
        labels, _ = state
        new = step(labels)
        return new, jnp.any(new != labels)

    labels0 = jnp.concatenate([labels0, jnp.array([size], jnp.int32)])
    labels, _ = lax.while_loop(cond, body, (labels0, jnp.array(True)))
    return labels[:size].reshape(height, width)


def _foreground(maps: jax.Array, threshold) -> jax.Array:
    peak = jnp.max(maps, axis=(-2, -1), keepdims=True)
    return (maps >= threshold * peak) & (peak > 0)


@partial(jax.jit, static_argnames="connectivity")
def _labels_impl(maps: jax.Array, threshold, connectivity: int) -> jax.Array:
    lead, (height, width) = maps.shape[:-2], maps.shape[-2:]
    mask = _foreground(maps, threshold).reshape(-1, height, width)
    labels = jax.vmap(lambda m: _label_one(m, connectivity))(mask)
    return labels.reshape(*lead, height, width)


def _check_maps(maps) -> jax.Array:
    maps = jnp.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"maps must have shape (..., H, W), got {maps.shape}")
    if maps.shape[-2] * maps.shape[-1] + 1 > jnp.iinfo(jnp.int32).max:
        raise ValueError(f"maps of {maps.shape[-2]}x{maps.shape[-1]} pixels are too large for int32 labels")
    return maps


def component_labels(maps: jax.Array, threshold: float = DEFAULT_THRESHOLD, connectivity: int = 8) -> jax.Array:
    """Connected-component labels of ``maps >= threshold * max(map)`` for maps ``(..., H, W)``.

    Returns int32 ``(..., H, W)``: each foreground pixel holds the flat index ``y * W + x`` of its
    component's first pixel in raster order; background holds ``H * W``. A map whose maximum is ``<= 0``
    has no foreground.
    """
    connectivity = _check_connectivity(connectivity)
    return _labels_impl(_check_maps(maps), threshold, connectivity)


def _box_one(labels: jax.Array, has_peak: jax.Array) -> jax.Array:
    height, width = labels.shape
    size = height * width
    flat = labels.reshape(-1)
    counts = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=size + 1)
    # argmax returns the first maximum: ties go to the smallest label = smallest first-pixel flat index.
    winner = jnp.argmax(counts[:size]).astype(jnp.int32)
    inside = labels == winner
    rows = jnp.any(inside, axis=1)
    cols = jnp.any(inside, axis=0)
    y0 = jnp.argmax(rows)
    y1 = height - jnp.argmax(rows[::-1])
    x0 = jnp.argmax(cols)
    x1 = width - jnp.argmax(cols[::-1])
    box = jnp.stack([x0, y0, x1, y1]).astype(jnp.int32)
    return jnp.where(has_peak & (counts[winner] > 0), box, jnp.zeros(4, jnp.int32))


def boxes(maps: jax.Array, threshold: float = DEFAULT_THRESHOLD, connectivity: int = 8) -> jax.Array:
    """Bounding box of the largest connected salient region of each map — the CAM paper's rule.

    Zhou et al., "Learning Deep Features for Discriminative Localization" (CVPR 2016): keep the pixels
    whose value is at least ``threshold`` (20% in the paper) of the map's maximum, take the largest
    connected component of that segmentation and return its bounding box.

    Args:
        maps: ``(..., H, W)`` real maps; any leading batch dimensions. Maps need not be normalized.
        threshold: fraction of each map's maximum; pixels ``>= threshold * max(map)`` are foreground.
            May be a traced scalar.
        connectivity: 8 (the 3x3 neighbourhood, diagonal neighbours connect) or 4 (edge neighbours only).
            Must be a Python int.

    Returns:
        int32 ``(..., 4)`` boxes ``[x0, y0, x1, y1]`` in pixel coordinates with an exclusive end: the box
        covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (``map[y0:y1, x0:x1]``). Ties between
        equally large components go to the one whose first pixel (raster order) comes first. A map whose
        maximum is ``<= 0`` (nothing salient, e.g. all zeros; also a NaN maximum) gives ``[0, 0, 0, 0]``.

    Pure JAX: jittable (``connectivity`` static), vmappable, no host round trips.
    """
    connectivity = _check_connectivity(connectivity)
    return _boxes_impl(_check_maps(maps), threshold, connectivity)


@partial(jax.jit, static_argnames="connectivity")
def _boxes_impl(maps: jax.Array, threshold, connectivity: int) -> jax.Array:
    lead, (height, width) = maps.shape[:-2], maps.shape[-2:]
    labels = _labels_impl(maps, threshold, connectivity).reshape(-1, height, width)
    has_peak = (jnp.max(maps, axis=(-2, -1)) > 0).reshape(-1)
    out = jax.vmap(_box_one)(labels, has_peak)
    return out.reshape(*lead, 4)


def box_area(box: jax.Array) -> jax.Array:
    """Area of ``[x0, y0, x1, y1]`` boxes (exclusive end), ``(..., 4) -> (...)``; inverted boxes count as 0."""
    box = jnp.asarray(box)
    width = jnp.maximum(box[..., 2] - box[..., 0], 0)
    height = jnp.maximum(box[..., 3] - box[..., 1], 0)
    return width * height


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union of boxes ``[x0, y0, x1, y1]`` (pixel coordinates, exclusive end).

    ``a`` and ``b`` are ``(..., 4)`` and broadcast against each other; returns float32 ``(...)``. With the
    exclusive-end convention the area of a box is ``(x1 - x0) * (y1 - y0)``. The IoU of two empty boxes
    (zero union) is 0.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape[-1:] != (4,) or b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {a.shape} and {b.shape}")
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    lo = jnp.maximum(a[..., :2], b[..., :2])
    hi = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(hi - lo, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
