"""flaxcam.localize: the CAM paper's box rule against an independent scipy.ndimage reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from flaxcam.localize import box_iou, boxes, component_labels

STRUCTURES = {8: np.ones((3, 3), bool), 4: ndimage.generate_binary_structure(2, 1)}


# ----------------------------------------------------------------------------------------------------
# Independent reference (scipy) and map generators
# ----------------------------------------------------------------------------------------------------


def _mask(m: np.ndarray, threshold: float) -> np.ndarray:
    m = np.asarray(m, np.float32)
    return m >= np.float32(threshold) * m.max()


def reference_box(m: np.ndarray, threshold: float = 0.2, connectivity: int = 8) -> list[int]:
    """Largest connected component of ``m >= threshold * max`` (scipy), its box [x0, y0, x1, y1), ties → first."""
    m = np.asarray(m, np.float32)
    if not m.max() > 0:
        return [0, 0, 0, 0]
    lab, n = ndimage.label(_mask(m, threshold), structure=STRUCTURES[connectivity])
    assert n >= 1
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    # scipy numbers components in raster order of their first pixel, so argmax's first maximum is the
    # component whose first pixel has the smallest flat index.
    k = int(np.argmax(sizes))
    rows, cols = ndimage.find_objects(lab)[k]
    return [cols.start, rows.start, cols.stop, rows.stop]


def reference_boxes(maps: np.ndarray, threshold: float = 0.2, connectivity: int = 8) -> np.ndarray:
    maps = np.asarray(maps, np.float32)
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = np.array([reference_box(m, threshold, connectivity) for m in flat], np.int64)
    return out.reshape(*maps.shape[:-2], 4)


def reference_labels(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Each foreground pixel → flat index of its component's first pixel; background → H*W."""
    h, w = mask.shape
    lab, n = ndimage.label(mask, structure=STRUCTURES[connectivity])
    out = np.full(h * w, h * w, np.int64)
    if n:
        first = np.asarray(ndimage.minimum(np.arange(h * w).reshape(h, w), lab, np.arange(1, n + 1)), np.int64)
        out[mask.ravel()] = first[lab.ravel()[mask.ravel()] - 1]
    return out.reshape(h, w)


def random_blobs(rng: np.random.Generator, shape: tuple[int, ...], max_blobs: int = 6) -> np.ndarray:
    """Smooth maps: sums of a random number of Gaussians of random width/height/position, + a small offset."""
    *lead, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    flat = np.zeros((int(np.prod(lead, dtype=int)), h, w), np.float32)
    for m in flat:
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
            sy, sx = rng.uniform(0.02, 0.2) * h, rng.uniform(0.02, 0.2) * w
            m += rng.uniform(0.2, 1.0) * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        m += rng.uniform(-0.05, 0.05)
    return flat.reshape(shape)


def spiral(h: int, w: int) -> np.ndarray:
    """A one-pixel-wide rectangular spiral starting at (0, 0), rings one empty pixel apart."""
    m = np.zeros((h, w), bool)
    inside = lambda y, x: 0 <= y < h and 0 <= x < w
    dirs = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    y = x = d = 0
    m[0, 0] = True
    while True:
        for turn in range(2):
            dy, dx = dirs[(d + turn) % 4]
            ny, nx = y + dy, x + dx
            if inside(ny, nx) and not m[ny, nx] and not (inside(ny + dy, nx + dx) and m[ny + dy, nx + dx]):
                d, y, x = (d + turn) % 4, ny, nx
                m[y, x] = True
                break
        else:
            return m


def column_zigzag(h: int, w: int) -> np.ndarray:
    """Boustrophedon snake of vertical runs (every other column), joined alternately at bottom and top."""
    m = np.zeros((h, w), bool)
    m[:, ::2] = True
    for k, c in enumerate(range(1, w - 1, 2)):
        m[h - 1 if k % 2 == 0 else 0, c] = True
    return m


# ----------------------------------------------------------------------------------------------------
# Agreement with scipy on many random maps
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("shape", [(12, 32, 32), (6, 45, 60), (3, 2, 17, 29), (4, 64, 23), (2, 1, 1), (3, 1, 40)])
def test_blobs_match_scipy(shape, connectivity):
    rng = np.random.default_rng([*shape, connectivity])
    maps = random_blobs(rng, shape)
    got = np.asarray(boxes(jnp.asarray(maps), connectivity=connectivity))
    assert got.dtype == np.int32 and got.shape == (*shape[:-2], 4)
    np.testing.assert_array_equal(got, reference_boxes(maps, 0.2, connectivity))


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8, 0.95])
def test_noise_maps_match_scipy(threshold, connectivity):
    """Noise: many components, complex shapes, and (at high thresholds) many equally sized ones (ties)."""
    rng = np.random.default_rng(int(threshold * 100) + connectivity)
    maps = rng.uniform(-0.3, 1.0, size=(10, 37, 53)).astype(np.float32)
    got = np.asarray(boxes(maps, threshold=threshold, connectivity=connectivity))
    np.testing.assert_array_equal(got, reference_boxes(maps, threshold, connectivity))


@pytest.mark.parametrize("connectivity", [8, 4])
def test_labels_match_scipy(connectivity):
    """The labelling itself: every pixel carries the flat index of its component's first pixel."""
    rng = np.random.default_rng(connectivity)
    maps = np.concatenate([random_blobs(rng, (4, 40, 52)), rng.uniform(size=(4, 40, 52)).astype(np.float32)])
    for threshold in (0.2, 0.6):
        got = np.asarray(component_labels(maps, threshold, connectivity))
        for m, g in zip(maps, got):
            np.testing.assert_array_equal(g, reference_labels(_mask(m, threshold), connectivity))


def test_large_non_square_maps():
    rng = np.random.default_rng(7)
    maps = random_blobs(rng, (3, 450, 600), max_blobs=8)
    for connectivity in (8, 4):
        got = np.asarray(boxes(maps, connectivity=connectivity))
        np.testing.assert_array_equal(got, reference_boxes(maps, 0.2, connectivity))


# ----------------------------------------------------------------------------------------------------
# Hand-built cases
# ----------------------------------------------------------------------------------------------------


def test_diagonal_touch_merges_only_with_8_connectivity():
    m = np.zeros((10, 12), np.float32)
    m[1:4, 1:4] = 1.0  # 3x3 block, rows 1-3, cols 1-3
    m[4:8, 4:8] = 0.9  # 4x4 block touching it only at a corner (3,3)-(4,4)
    np.testing.assert_array_equal(boxes(m, connectivity=8), [1, 1, 8, 8])
    np.testing.assert_array_equal(boxes(m, connectivity=4), [4, 4, 8, 8])  # the larger of the two
    # Equal sizes under 4-connectivity: the tie goes to the component whose first pixel comes first.
    m2 = np.zeros((10, 12), np.float32)
    m2[4:7, 4:7] = 1.0
    m2[1:4, 1:4] = 0.5
    np.testing.assert_array_equal(boxes(m2, connectivity=4), [1, 1, 4, 4])
    np.testing.assert_array_equal(boxes(m2, connectivity=8), [1, 1, 7, 7])
    np.testing.assert_array_equal(boxes(m2, threshold=0.6, connectivity=4), [4, 4, 7, 7])


def test_box_convention_exclusive_end():
    m = np.zeros((7, 9), np.float32)
    m[2:5, 3:8] = 1.0  # rows 2..4, columns 3..7
    x0, y0, x1, y1 = np.asarray(boxes(m)).tolist()
    assert (x0, y0, x1, y1) == (3, 2, 8, 5)
    np.testing.assert_array_equal(m[y0:y1, x0:x1], 1.0)
    single = np.zeros((5, 6), np.float32)
    single[4, 5] = 3.0
    np.testing.assert_array_equal(boxes(single), [5, 4, 6, 5])


def test_no_salient_pixel_gives_empty_box():
    maps = np.zeros((3, 8, 11), np.float32)
    maps[1] = -1.0 - np.random.default_rng(0).uniform(size=(8, 11))  # all negative
    maps[2, 3, 4] = np.nan
    np.testing.assert_array_equal(boxes(maps), np.zeros((3, 4), np.int32))
    # A map whose maximum is exactly zero (negative elsewhere): still nothing salient.
    m = np.full((4, 5), -2.0, np.float32)
    m[1, 1] = 0.0
    np.testing.assert_array_equal(boxes(m), [0, 0, 0, 0])
    # The smallest positive maximum is salient.
    m[2, 3] = 1e-30
    np.testing.assert_array_equal(boxes(m), [3, 2, 4, 3])


def test_full_map_is_one_component():
    np.testing.assert_array_equal(boxes(np.ones((2, 13, 17), np.float32)), [[0, 0, 17, 13]] * 2)


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("shape", [(101, 101), (40, 157)])
def test_spiral_converges(shape, connectivity):
    """A ~N/2-pixel spiral whose first pixel (the minimum label) is at its outer end."""
    snake = spiral(*shape)
    assert ndimage.label(snake, structure=STRUCTURES[8])[1] == 1
    maps = np.where(snake, 1.0, 0.0).astype(np.float32)
    labels = np.asarray(component_labels(maps, connectivity=connectivity))
    np.testing.assert_array_equal(labels, reference_labels(snake, connectivity))
    assert np.all(labels[snake] == 0)
    np.testing.assert_array_equal(boxes(maps, connectivity=connectivity), reference_box(maps, 0.2, connectivity))
    # Reversed, the spiral starts in the middle and its minimum label sits at the inner end of the path.
    rev = maps[::-1, ::-1].copy()
    np.testing.assert_array_equal(
        component_labels(rev, connectivity=connectivity), reference_labels(rev > 0, connectivity)
    )


def test_zigzag_snake_with_distractor():
    """A long zigzag beats a compact blob that comes first in raster order."""
    h, w = 30, 201
    m = np.zeros((h + 8, w), np.float32)
    m[8:, :] = column_zigzag(h, w)  # ~ 101 * 30 pixels
    m[0:6, 0:6] = 1.0  # 36 pixels, first in raster order, separated by empty rows 6-7
    for connectivity in (4, 8):
        np.testing.assert_array_equal(boxes(m, connectivity=connectivity), [0, 8, w, h + 8])
        np.testing.assert_array_equal(
            component_labels(m, connectivity=connectivity), reference_labels(m > 0, connectivity)
        )


def test_connectivity_validated():
    m = np.ones((4, 4), np.float32)
    for bad in (6, 0, "8", 8.5, True):
        with pytest.raises(ValueError, match="connectivity"):
            boxes(m, connectivity=bad)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        boxes(np.ones(5, np.float32))


# ----------------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [8, 4])
def test_jit_vmap_and_loop_agree(connectivity):
    rng = np.random.default_rng(11)
    maps = jnp.asarray(random_blobs(rng, (2, 5, 24, 31)))
    eager = np.asarray(boxes(maps, connectivity=connectivity))
    jitted = np.asarray(jax.jit(boxes, static_argnames="connectivity")(maps, connectivity=connectivity))
    vmapped = np.asarray(jax.vmap(jax.vmap(lambda m: boxes(m, connectivity=connectivity)))(maps))
    looped = np.stack([np.stack([np.asarray(boxes(m, connectivity=connectivity)) for m in row]) for row in maps])
    for other in (jitted, vmapped, looped):
        np.testing.assert_array_equal(eager, other)
    np.testing.assert_array_equal(eager, reference_boxes(np.asarray(maps), 0.2, connectivity))


def test_traced_threshold():
    rng = np.random.default_rng(3)
    maps = random_blobs(rng, (6, 30, 30))
    f = jax.jit(lambda m, t: boxes(m, t))
    for t in (0.1, 0.2, 0.7):
        np.testing.assert_array_equal(f(maps, t), reference_boxes(maps, t))
    # vmapping over per-map thresholds
    ts = jnp.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.2], jnp.float32)
    got = jax.vmap(lambda m, t: boxes(m, t))(maps, ts)
    want = np.stack([reference_box(m, float(t)) for m, t in zip(maps, np.asarray(ts))])
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------
# box_iou
# ----------------------------------------------------------------------------------------------------


def test_box_iou_hand_computed():
    a = jnp.array([0, 0, 10, 10])
    b = jnp.array([5, 5, 15, 20])
    # intersection [5, 10) x [5, 10) = 25; areas 100 and 150; union 225
    np.testing.assert_allclose(box_iou(a, b), 25 / 225, rtol=1e-6)
    np.testing.assert_allclose(box_iou(a, a), 1.0)
    assert float(box_iou(a, jnp.array([10, 0, 20, 10]))) == 0.0  # touching edges, exclusive end: no overlap
    assert float(box_iou(jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))) == 0.0  # two empty boxes
    assert float(box_iou(jnp.zeros(4, jnp.int32), a)) == 0.0
    # a one-pixel box inside a 2x2 box
    np.testing.assert_allclose(box_iou(jnp.array([3, 4, 4, 5]), jnp.array([3, 4, 5, 6])), 0.25)


def test_box_iou_batched_matches_numpy():
    rng = np.random.default_rng(5)
    lo = rng.integers(0, 20, size=(3, 1, 2))
    a = np.concatenate([lo, lo + rng.integers(0, 10, size=(3, 1, 2))], -1)
    lo = rng.integers(0, 20, size=(1, 4, 2))
    b = np.concatenate([lo, lo + rng.integers(0, 10, size=(1, 4, 2))], -1)
    got = np.asarray(box_iou(a, b))
    assert got.shape == (3, 4) and got.dtype == np.float32
    for i in range(3):
        for j in range(4):
            A, B = a[i, 0], b[0, j]
            pa = np.zeros((40, 40), bool)
            pb = np.zeros((40, 40), bool)
            pa[A[1] : A[3], A[0] : A[2]] = True
            pb[B[1] : B[3], B[0] : B[2]] = True
            union = (pa | pb).sum()
            want = (pa & pb).sum() / union if union else 0.0
            np.testing.assert_allclose(got[i, j], want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(box_iou)(a, b), got)
