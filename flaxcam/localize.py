"""Bounding boxes from class activation maps, on device and batched.

Every box rule here segments each map with one per-map cut value and boxes the largest connected
component of that segmentation (one labeller, below); the rules differ only in the cut
(:data:`BOX_RULES`, :func:`rule_cuts`). The default rule, ``"paper"``, is the one of the CAM paper (Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep
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
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax

#: The CAM paper's segmentation threshold, as a fraction of each map's maximum.
DEFAULT_THRESHOLD = 0.2

#: The map resolution (cells along the shorter side) the paper's 20% rule was set for: GoogLeNet-GAP's
#: 14x14 maps at 224x224 inputs.
PAPER_MAP_SIZE = 14

#: Share of a map's (positive) mass that the ``"energy"`` rule's region holds: the best of 0.3, 0.5, 0.7
#: on the development split of ``experiments/real_photo_boxes.py`` (docs/localization.md).
DEFAULT_ENERGY_SHARE = 0.7

#: Bins of the ``"otsu"`` rule's histogram (scikit-image's ``threshold_otsu`` default).
OTSU_BINS = 256

#: The box rules of :func:`boxes`, each documented in :func:`rule_cuts`.
BOX_RULES = ("paper", "resolution", "otsu", "energy", "auto")

#: ``"auto"``: the rule used for maps whose native resolution (cells along the shorter side) is at most
#: the key, first match. Up to the paper's 14x14, the best of the library's rules on the development
#: split of ``experiments/real_photo_boxes.py``: the energy rule (at its default share, 0.7) on both
#: EfficientNet-Lite0's 7x7 maps at 224 and its 14x14 atrous maps (:func:`flaxcam.models.atrous`). For
#: finer maps the paper's rule (the digits canvases' 16x16 maps: 0.951 with it), see docs/localization.md.
AUTO_RULES: tuple[tuple[float, str], ...] = ((PAPER_MAP_SIZE, "energy"), (float("inf"), "paper"))

__all__ = [
    "AUTO_RULES",
    "BOX_RULES",
    "DEFAULT_ENERGY_SHARE",
    "DEFAULT_THRESHOLD",
    "PAPER_MAP_SIZE",
    "auto_rule",
    "box_area",
    "box_iou",
    "boxes",
    "check_rule",
    "component_labels",
    "empty_boxes",
    "native_shape",
    "resolution_threshold",
    "rule_cuts",
]


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


def _foreground(maps: jax.Array, cuts: jax.Array) -> jax.Array:
    """Pixels ``>= cut`` of maps ``(..., H, W)`` with cuts ``(...)``; nothing of a map whose maximum is ``<= 0``."""
    peak = jnp.max(maps, axis=(-2, -1), keepdims=True)
    return (maps >= cuts[..., None, None]) & (peak > 0)


def _paper_cuts(maps: jax.Array, threshold) -> jax.Array:
    return threshold * jnp.max(maps, axis=(-2, -1))


@partial(jax.jit, static_argnames="connectivity")
def _labels_of_mask(mask: jax.Array, connectivity: int) -> jax.Array:
    lead, (height, width) = mask.shape[:-2], mask.shape[-2:]
    labels = jax.vmap(lambda m: _label_one(m, connectivity))(mask.reshape(-1, height, width))
    return labels.reshape(*lead, height, width)


@partial(jax.jit, static_argnames="connectivity")
def _labels_impl(maps: jax.Array, threshold, connectivity: int) -> jax.Array:
    return _labels_of_mask(_foreground(maps, _paper_cuts(maps, threshold)), connectivity)


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


def resolution_threshold(map_shape: tuple[int, int]) -> float:
    r"""The ``"resolution"`` rule's threshold (fraction of the maximum) for a native map of ``map_shape``.

    Derived from how bilinear upsampling spreads a blob, calibrated only by the paper's own setting.
    Upsampling an ``h x w`` map to ``H x W`` turns one active cell (value ``v``, neighbours 0) into a tent
    :math:`v\,(1 - |x - c| / s)` of half-width :math:`s = H / h` pixels around the cell centre ``c``; the
    segmentation ``>= t v`` then reaches :math:`(1 - t)\,s` pixels from the centre, a fraction
    :math:`(1 - t) / h` of the image side. The CAM paper's 20% rule on 14x14 maps lets a blob spread by
    :math:`0.8 / 14` of the side. Keeping that spread on a coarser map gives

    .. math:: t(h) = \max\bigl(t_\text{paper},\; 1 - (1 - t_\text{paper})\, h / 14\bigr),
        \quad h = \min(\text{map height}, \text{map width}),

    so 0.6 for EfficientNet-Lite0's 7x7 maps at 224x224 and the paper's 0.2 for 14x14 or finer maps
    (where the formula would go below the paper's threshold, the paper's rule is kept).
    """
    cells = min(int(map_shape[0]), int(map_shape[1]))
    if cells < 1:
        raise ValueError(f"map_shape must be positive (h, w), got {tuple(map_shape)}")
    return max(DEFAULT_THRESHOLD, 1.0 - (1.0 - DEFAULT_THRESHOLD) * cells / PAPER_MAP_SIZE)


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`BOX_RULES`, else a ValueError listing the valid rules."""
    if not isinstance(rule, str) or rule not in BOX_RULES:
        raise ValueError(f"unknown box rule {rule!r}; valid rules: {', '.join(BOX_RULES)}")
    return rule


def native_shape(low_res) -> tuple[int, int]:
    """The native ``(h, w)`` of an explanation's ``low_res`` maps (``(..., h, w)``, or a tuple of them when
    several layers were fused: the finest), the ``map_shape`` of :func:`boxes`."""
    arrays = low_res if isinstance(low_res, (tuple, list)) else (low_res,)
    shapes = (tuple(int(v) for v in jnp.shape(a)[-2:]) for a in arrays)
    return cast(tuple[int, int], max(shapes, key=lambda hw: hw[0] * hw[1]))


def auto_rule(map_shape: tuple[int, int]) -> str:
    """The rule ``"auto"`` uses for maps of native resolution ``map_shape`` (:data:`AUTO_RULES`)."""
    cells = min(int(map_shape[0]), int(map_shape[1]))
    return next(rule for limit, rule in AUTO_RULES if cells <= limit)


def _otsu_cuts(maps: jax.Array) -> jax.Array:
    """Otsu's threshold of each map (..., H, W): scikit-image's ``threshold_otsu`` (256 bins over [min, max])."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).astype(jnp.float32)

    def one(values):
        low, high = jnp.min(values), jnp.max(values)
        span = jnp.where(high > low, high - low, 1.0)
        index = jnp.clip(jnp.floor((values - low) / span * OTSU_BINS), 0, OTSU_BINS - 1).astype(jnp.int32)
        counts = jnp.zeros(OTSU_BINS, jnp.float32).at[index].add(1.0)
        centers = low + (jnp.arange(OTSU_BINS, dtype=jnp.float32) + 0.5) * span / OTSU_BINS
        weight1 = jnp.cumsum(counts)
        weight2 = jnp.cumsum(counts[::-1])[::-1]
        mass = counts * centers
        mean1 = jnp.cumsum(mass) / jnp.maximum(weight1, 1.0)
        mean2 = jnp.cumsum(mass[::-1])[::-1] / jnp.maximum(weight2, 1.0)
        between = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
        cut = centers[jnp.argmax(between)]
        # A constant map: scikit-image returns its value, so the whole map is foreground.
        return jnp.where(high > low, cut, high)

    return jax.vmap(one)(flat).reshape(lead)


def _energy_cuts(maps: jax.Array, share) -> jax.Array:
    """The largest value ``c`` with ``sum(m[m >= c]) >= share * sum(m[m > 0])``, per map (..., H, W)."""
    lead = maps.shape[:-2]
    flat = jnp.maximum(maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).astype(jnp.float32), 0.0)
    ordered = -jnp.sort(-flat, axis=-1)  # descending
    mass = jnp.cumsum(ordered, axis=-1)
    reached = mass >= share * mass[:, -1:]
    index = jnp.argmax(reached, axis=-1)
    cut = jnp.take_along_axis(ordered, index[:, None], axis=-1)[:, 0]
    # Never below the smallest positive value: zero pixels carry no mass.
    return jnp.where(cut > 0, cut, jnp.finfo(jnp.float32).tiny).reshape(lead)


def rule_cuts(
    maps: jax.Array,
    rule: str = "paper",
    *,
    threshold: float = DEFAULT_THRESHOLD,
    map_shape: tuple[int, int] | None = None,
    energy_share: float = DEFAULT_ENERGY_SHARE,
) -> jax.Array:
    """Per-map cut values ``(...)`` of a box rule for maps ``(..., H, W)``: the foreground is ``map >= cut``.

    Rules (:data:`BOX_RULES`):

    * ``"paper"``: ``threshold * max(map)``, 20% in Zhou et al., "Learning Deep Features for
      Discriminative Localization", CVPR 2016 (set for GoogLeNet-GAP's 14x14 maps).
    * ``"resolution"``: :func:`resolution_threshold` ``(map_shape) * max(map)``: the paper's rule with the
      threshold raised for maps coarser than 14x14 so that bilinear upsampling spreads a blob no further
      (as a fraction of the image) than in the paper's setting.
    * ``"otsu"``: Otsu's threshold of the map's histogram (256 bins over [min, max]), the cut that
      maximizes the between-class variance — N. Otsu, "A Threshold Selection Method from Gray-Level
      Histograms", IEEE Trans. SMC 9(1), 1979; scikit-image's ``threshold_otsu``. A constant map is all
      foreground (if positive).
    * ``"energy"``: the highest-valued pixels that together hold ``energy_share`` of the map's positive
      mass (a highest-density region, the map read as a distribution over pixels, as the energy-based
      pointing game of Wang et al., "Score-CAM", CVPR-W 2020, reads it).
    * ``"auto"``: :func:`auto_rule` ``(map_shape)``, the rule recommended for the map's native resolution.

    ``map_shape``: the map's native (layer) resolution ``(h, w)`` before upsampling, e.g.
    ``Explanation.low_res.shape[-2:]``; default: the maps' own shape (maps not upsampled).
    """
    rule, native = _resolve_rule(maps.shape, rule, map_shape, energy_share)
    return _cuts_impl(jnp.asarray(maps), threshold, energy_share, rule, native)


def _resolve_rule(shape: tuple[int, ...], rule: str, map_shape, energy_share) -> tuple[str, tuple[int, int]]:
    """Check a rule and its options on the host; ``"auto"`` becomes the rule it stands for."""
    check_rule(rule)
    native = tuple(int(v) for v in (shape[-2:] if map_shape is None else map_shape))
    if len(native) != 2 or min(native) < 1:
        raise ValueError(f"map_shape must be the maps' native (h, w), got {map_shape!r}")
    if rule == "energy" and not 0.0 < float(energy_share) <= 1.0:
        raise ValueError(f"energy_share must be in (0, 1], got {energy_share!r}")
    return (auto_rule(native) if rule == "auto" else rule), native


@partial(jax.jit, static_argnames=("rule", "native"))
def _cuts_impl(maps: jax.Array, threshold, energy_share, rule: str, native: tuple[int, int]) -> jax.Array:
    if rule == "paper":
        return _paper_cuts(maps, threshold)
    if rule == "resolution":
        return _paper_cuts(maps, resolution_threshold(native))
    if rule == "otsu":
        return _otsu_cuts(maps)
    return _energy_cuts(maps, energy_share)


def boxes(
    maps: jax.Array,
    threshold: float = DEFAULT_THRESHOLD,
    connectivity: int = 8,
    *,
    rule: str = "paper",
    map_shape: tuple[int, int] | None = None,
    energy_share: float = DEFAULT_ENERGY_SHARE,
) -> jax.Array:
    """Bounding box of the largest connected salient region of each map.

    The default rule is the CAM paper's: Zhou et al., "Learning Deep Features for Discriminative
    Localization" (CVPR 2016): keep the pixels whose value is at least ``threshold`` (20% in the paper)
    of the map's maximum, take the largest connected component of that segmentation and return its
    bounding box. ``rule`` picks another cut (:func:`rule_cuts`: ``"resolution"``, ``"otsu"``,
    ``"energy"``, ``"auto"``); the component and the box are found the same way for every rule.

    Args:
        maps: ``(..., H, W)`` real maps; any leading batch dimensions. Maps need not be normalized.
        threshold: ``"paper"`` rule only: fraction of each map's maximum; pixels ``>= threshold *
            max(map)`` are foreground. May be a traced scalar.
        connectivity: 8 (the 3x3 neighbourhood, diagonal neighbours connect) or 4 (edge neighbours only).
            Must be a Python int.
        rule: one of :data:`BOX_RULES` (a Python string).
        map_shape: the maps' native resolution ``(h, w)`` before upsampling (``Explanation.low_res.shape[-2:]``),
            used by ``"resolution"`` and ``"auto"``; default: the maps' own shape.
        energy_share: ``"energy"`` rule only: the share of the map's positive mass the region holds.

    Returns:
        int32 ``(..., 4)`` boxes ``[x0, y0, x1, y1]`` in pixel coordinates with an exclusive end: the box
        covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (``map[y0:y1, x0:x1]``). Ties between
        equally large components go to the one whose first pixel (raster order) comes first. A map whose
        maximum is ``<= 0`` (nothing salient, e.g. all zeros; also a NaN maximum) gives the empty box
        ``[0, 0, 0, 0]``, flagged by :func:`empty_boxes` (area 0; its IoU with any box is 0, never NaN).

    Raises:
        ValueError: an unknown ``rule`` (the message lists the valid ones) or ``connectivity``.

    Pure JAX: jittable (``connectivity``, ``rule`` and ``map_shape`` static), vmappable, no host round trips.
    """
    connectivity = _check_connectivity(connectivity)
    maps = _check_maps(maps)
    if rule == "paper":
        return _boxes_impl(maps, threshold, connectivity)
    rule, native = _resolve_rule(maps.shape, rule, map_shape, energy_share)
    return _rule_boxes_impl(maps, threshold, energy_share, rule, native, connectivity)


def empty_boxes(box: jax.Array) -> jax.Array:
    """``True`` where a box ``(..., 4)`` is empty (zero area): :func:`boxes` found nothing salient."""
    return box_area(box) == 0


@partial(jax.jit, static_argnames="connectivity")
def _boxes_impl(maps: jax.Array, threshold, connectivity: int) -> jax.Array:
    return _boxes_of_mask(
        _foreground(maps, _paper_cuts(maps, threshold)), jnp.max(maps, axis=(-2, -1)) > 0, connectivity
    )


@partial(jax.jit, static_argnames=("rule", "native", "connectivity"))
def _rule_boxes_impl(
    maps: jax.Array, threshold, energy_share, rule: str, native: tuple[int, int], connectivity: int
) -> jax.Array:
    cuts = _cuts_impl(maps, threshold, energy_share, rule, native)
    return _boxes_of_mask(_foreground(maps, cuts), jnp.max(maps, axis=(-2, -1)) > 0, connectivity)


@partial(jax.jit, static_argnames="connectivity")
def _boxes_of_mask(mask: jax.Array, has_peak: jax.Array, connectivity: int) -> jax.Array:
    lead, (height, width) = mask.shape[:-2], mask.shape[-2:]
    labels = _labels_of_mask(mask, connectivity).reshape(-1, height, width)
    out = jax.vmap(_box_one)(labels, has_peak.reshape(-1))
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
