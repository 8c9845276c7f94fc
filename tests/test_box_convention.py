"""One box convention, ``[x0, y0, x1, y1]`` (pixels, exclusive end), from a source to the audit's columns.

A non-square box on a non-square image goes through ``ArraySource`` → ``iterate_batches`` (resized to a
non-square input, so x and y scale differently) → the audit's on-device statistics and its Parquet
columns; a box read in another order anywhere on the way gives the wrong energy, IoU or columns.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxcam import localize
from flaxcam.audit import rows
from flaxcam.audit import stats as stats_lib
from flaxcam.data import ArraySource, iterate_batches, save_npz
from flaxcam.imageio import Preprocessing

HEIGHT, WIDTH = 40, 60  # the image
INPUT = (20, 45)  # the model input (H, W): x scaled by 3/4, y by 1/2
BOX = (6, 4, 50, 16)  # [x0, y0, x1, y1]: 44 px wide, 12 px tall
INPUT_BOX = (4.5, 2.0, 37.5, 8.0)  # the same box in input pixels


def _image() -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    x0, y0, x1, y1 = BOX
    image[y0:y1, x0:x1] = 255
    return image


def _share(m: np.ndarray, box) -> float:
    """Share of ``m``'s mass on the pixels whose centre lies in ``box`` = [x0, y0, x1, y1] (float64 loop)."""
    x0, y0, x1, y1 = box
    inside = sum(
        float(m[y, x])
        for y in range(m.shape[0])
        for x in range(m.shape[1])
        if x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1
    )
    return inside / float(m.astype(np.float64).sum())


def _transposed(box):
    """The box read in the other order, (y0, x0, y1, x1)."""
    return (box[1], box[0], box[3], box[2])


def test_a_non_square_box_keeps_its_meaning_from_the_source_to_the_audit_columns():
    source = ArraySource([_image(), _image()], [0, 1], boxes=[BOX, [np.nan] * 4])
    assert source[0].box == BOX
    (batch,) = iterate_batches(source, Preprocessing(INPUT, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), 2)
    np.testing.assert_allclose(batch.boxes[0], INPUT_BOX)
    assert np.isnan(batch.boxes[1]).all()

    # The map is the resized bright rectangle itself, plus a little mass everywhere else.
    maps = (np.clip(batch.images[..., 0], 0.0, 1.0) + np.float32(0.01)).astype(np.float32)
    expected_share = _share(maps[0], INPUT_BOX)
    assert expected_share > 0.9 and _share(maps[0], _transposed(INPUT_BOX)) < 0.5

    stats = jax.device_get(stats_lib.attention_stats(maps, batch.boxes))
    assert stats["gt_share"][0] == pytest.approx(expected_share, rel=1e-5)
    assert np.isnan(stats["gt_share"][1])

    # The audit's summary and the rows it writes: the rule's box, the ground truth and their IoU.
    probabilities = np.full((2, 2), 0.5, np.float32)
    summary = jax.device_get(
        stats_lib.summarize(
            maps,
            maps,
            probabilities,
            np.zeros(2, np.int32),
            batch.boxes,
            None,
            0.2,
            top_k=1,
            border=0.1,
            corner=0.2,
            with_masks=False,
            box_resolution=None,
        )
    )
    columns = rows._host_columns(rows._BatchMeta.of(batch), summary, 0)
    assert columns is not None
    rule_box = [int(columns[f"box_{k}"][0]) for k in ("x0", "y0", "x1", "y1")]
    np.testing.assert_array_equal(rule_box, np.asarray(localize.boxes(maps[0])))
    ground_truth = [float(columns[f"gt_{k}"][0]) for k in ("x0", "y0", "x1", "y1")]
    np.testing.assert_allclose(ground_truth, INPUT_BOX)
    want_iou = float(localize.box_iou(np.asarray(rule_box, np.float32), np.asarray(INPUT_BOX, np.float32)))
    assert want_iou > 0.8  # the rule finds the rectangle: a transposed box would overlap it far less
    assert columns["box_iou"][0] == pytest.approx(want_iou, abs=1e-6)
    assert columns["gt_share"][0] == pytest.approx(expected_share, rel=1e-5)
    assert np.isnan(columns["box_iou"][1]) and np.isnan(columns["gt_x0"][1])


@pytest.mark.parametrize(
    "boxes",
    [np.zeros((2, 2, 2)), np.zeros((3, 4)), np.zeros(8), [[0, 0, 4], [0, 0, 4]]],
    ids=["2x2x2", "3 rows for 2 images", "flat", "3 values"],
)
def test_boxes_of_the_wrong_shape_are_refused_with_the_order(boxes, tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(2, 4\): one row \[x0, y0, x1, y1\] \(pixels, exclusive end\) per image"):
        ArraySource(images, boxes=boxes)
    with pytest.raises(ValueError, match=r"\[x0, y0, x1, y1\]"):
        save_npz(tmp_path / "bad", images, boxes=np.asarray(boxes))


def test_a_box_that_ends_before_it_starts_is_refused_with_the_order():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"box 1 is \[4\.0, 1\.0, 2\.0, 6\.0\].*\[x0, y0, x1, y1\]"):
        ArraySource(images, boxes=[[0, 0, 4, 4], [4, 1, 2, 6]])
    assert ArraySource(images, boxes=[[0, 0, 4, 4], [np.nan] * 4])[1].box is None  # NaN: no box


def test_attention_stats_refuse_boxes_of_the_wrong_shape():
    maps = np.ones((2, 6, 6), np.float32)
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \(2, 4\), one \[x0, y0, x1, y1\] row"):
        stats_lib.attention_stats(maps, np.zeros((2, 2, 2), np.float32))
