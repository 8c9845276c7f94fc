"""flaxcam.metrics against float64 NumPy / SciPy derivations written here independently."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from flaxcam import metrics


def _random_maps(rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    """Blobby maps (smoothed noise, a few plateaus of ties) so the 20% rule gives several components."""
    noise = rng.random((batch, height, width))
    maps = scipy.ndimage.gaussian_filter(noise, sigma=(0, 2, 2))
    maps = np.maximum(maps - np.quantile(maps, 0.4, axis=(1, 2), keepdims=True), 0.0)
    return (maps / maps.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def _random_boxes(rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    x0 = rng.integers(0, width - 4, batch)
    y0 = rng.integers(0, height - 4, batch)
    x1 = x0 + rng.integers(2, width - x0 + 1)
    y1 = y0 + rng.integers(2, height - y0 + 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def _reference_box(m: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """20% rule with scipy: largest 8-connected component of m >= t * max, ties to the first in raster order."""
    if m.max() <= 0:
        return (0, 0, 0, 0)
    labels, count = scipy.ndimage.label(m >= threshold * m.max(), structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    winner = int(np.argmax(sizes)) + 1  # scipy numbers components in raster order of their first pixel
    rows, cols = np.nonzero(labels == winner)
    return (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def _reference_iou(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_point(m: np.ndarray, box, tolerance: float) -> float:
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    cy, cx = y + 0.5, x + 0.5
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    if x0 <= cx < x1 and y0 <= cy < y1:
        return 1.0
    dx = max(x0 - cx, cx - x1, 0.0)
    dy = max(y0 - cy, cy - y1, 0.0)
    return float(tolerance > 0 and np.hypot(dx, dy) <= tolerance)


def _reference_energy(m: np.ndarray, box) -> float:
    m = np.maximum(m.astype(np.float64), 0.0)
    x0, y0, x1, y1 = box
    total = m.sum()
    within = sum(
        m[y, x] for y in range(m.shape[0]) for x in range(m.shape[1]) if x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1
    )
    return within / total if total > 0 else 0.0


@pytest.fixture
def sample():
    rng = np.random.default_rng(7)
    maps = _random_maps(rng, 12, 24, 32)
    boxes = _random_boxes(rng, 12, 24, 32)
    return maps, boxes


def test_box_iou_and_hits_match_scipy_float64(sample):
    maps, boxes = sample
    expected = np.array([_reference_iou(_reference_box(m, 0.2), b) for m, b in zip(maps, boxes)])
    np.testing.assert_allclose(np.asarray(metrics.box_iou_scores(maps, boxes)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(metrics.box_hits(maps, boxes)), (expected >= 0.5).astype(np.float32))


def test_box_hits_on_boxes_near_the_predicted_ones(sample):
    maps, _ = sample
    predicted = np.array([_reference_box(m, 0.2) for m in maps], np.float32)
    shifted = predicted + np.array([1, 0, 1, 0], np.float32) * np.arange(len(maps))[:, None] % 7
    expected = np.array([_reference_iou(p, s) >= 0.5 for p, s in zip(predicted, shifted)], np.float32)
    assert 0 < expected.sum() < len(expected)  # both outcomes occur
    np.testing.assert_array_equal(np.asarray(metrics.box_hits(maps, shifted)), expected)


def test_pointing_matches_float64(sample):
    maps, boxes = sample
    # Boxes around each map's peak, their edges a few pixels either side of it: hits, near misses, misses.
    rng = np.random.default_rng(11)
    peaks = np.array([np.unravel_index(int(np.argmax(m)), m.shape) for m in maps])
    low = peaks[:, ::-1] + rng.integers(-4, 3, (len(maps), 2))
    near = np.concatenate([low, low + rng.integers(1, 6, (len(maps), 2))], axis=1).astype(np.float32)
    near = np.concatenate([near, boxes])
    maps = np.concatenate([maps, maps])
    results = {}
    for tolerance in (0.0, 3.0):
        expected = np.array([_reference_point(m, b, tolerance) for m, b in zip(maps, near)])
        got = np.asarray(metrics.pointing_hits(maps, near, tolerance=tolerance))
        np.testing.assert_array_equal(got, expected)
        results[tolerance] = expected
    assert 0 < results[0.0].sum() < results[3.0].sum() < len(maps)  # the cases differ


def test_pointing_edges_are_exclusive():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 3, 5] = 1.0  # x = 5 is the exclusive end of the box: outside
    maps[1, 3, 4] = 1.0  # x = 4, last column inside
    boxes = np.array([[2, 2, 5, 6], [2, 2, 5, 6]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.pointing_hits(maps, boxes)), [0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(metrics.pointing_hits(maps, boxes, tolerance=1.0)), [1.0, 1.0])


def test_energy_matches_float64_with_fractional_boxes(sample):
    maps, boxes = sample
    maps = maps - 0.1  # negative values are clipped
    boxes = boxes + np.float32(0.3)
    expected = np.array([_reference_energy(m, b) for m, b in zip(maps, boxes)])
    np.testing.assert_allclose(np.asarray(metrics.energy_in_box(maps, boxes)), expected, rtol=1e-5, atol=1e-6)


def test_missing_boxes_give_nan_and_zero_maps_give_zero():
    maps = np.zeros((2, 6, 6), np.float32)
    boxes = np.array([[0, 0, 3, 3], [np.nan, 0, 3, 3]], np.float32)
    for fn in (metrics.box_iou_scores, metrics.box_hits, metrics.pointing_hits, metrics.energy_in_box):
        out = np.asarray(fn(maps, boxes))
        assert np.isnan(out[1]) and not np.isnan(out[0]), fn.__name__
    assert float(metrics.energy_in_box(maps, boxes)[0]) == 0.0
    assert float(metrics.box_iou_scores(maps, boxes)[0]) == 0.0  # no salient region: empty box


def test_rank_correlation_matches_scipy_with_ties(sample):
    maps, _ = sample
    rng = np.random.default_rng(3)
    other = np.clip(maps + 0.3 * rng.standard_normal(maps.shape).astype(np.float32), 0, None)  # many ties at 0
    expected = np.array([scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(maps, other)])
    np.testing.assert_allclose(np.asarray(metrics.rank_correlation(maps, other)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.rank_correlation(maps, maps)), 1.0, rtol=1e-6)
    assert np.isnan(np.asarray(metrics.rank_correlation(np.ones((1, 4, 4)), maps[:1, :4, :4]))[0])


def test_errors_name_the_expected_shapes():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        metrics.box_hits(np.zeros((4, 4)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        metrics.energy_in_box(np.zeros((2, 4, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="tolerance"):
        metrics.pointing_hits(np.zeros((1, 4, 4)), np.zeros((1, 4)), tolerance=-1)
    with pytest.raises(ValueError, match="same shape"):
        metrics.rank_correlation(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
