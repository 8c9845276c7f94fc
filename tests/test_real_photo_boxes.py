"""The real-photo localization benchmark generator (experiments/real_photo_boxes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import real_photo_boxes as rpb

CONFIG = json.loads((Path(rpb.__file__).parent / "configs" / "real_photo_boxes.json").read_text())


@pytest.fixture(scope="module")
def small():
    config = {**CONFIG, "count": 30, "size": 160}
    return config, rpb.make_benchmark(config)


def test_benchmark_is_deterministic_and_boxes_follow_the_spec(small):
    config, bench = small
    again = rpb.make_benchmark(config)
    np.testing.assert_array_equal(bench.images, again.images)
    np.testing.assert_array_equal(bench.boxes, again.boxes)
    size = config["size"]
    assert bench.images.shape == (30, size, size, 3) and bench.images.dtype == np.uint8
    x0, y0, x1, y1 = bench.boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= size).all() and (y1 <= size).all()
    longer = np.maximum(x1 - x0, y1 - y0) / size
    assert (longer >= 0.2 - 1 / size).all() and (longer <= 0.7 + 1 / size).all()
    np.testing.assert_array_equal(bench.kinds, np.arange(30) % len(rpb.KINDS_ORDER))
    assert bench.held_out.sum() == 15 and not bench.held_out[0] and bench.held_out[1]
    # each kind appears in both splits
    for kind in range(len(rpb.KINDS_ORDER)):
        assert bench.held_out[bench.kinds == kind].any() and (~bench.held_out[bench.kinds == kind]).any()


def test_pasted_object_is_inside_its_box(small):
    """The box holds the pasted photo crop: its pixels are the resized crop, outside is the texture."""
    config, bench = small
    photos = rpb.source_photos()
    for i in range(5):
        kind = rpb.KINDS_ORDER[bench.kinds[i]]
        spec = config["objects"][kind]
        x0, y0, x1, y1 = bench.boxes[i]
        crop = photos[spec["photo"]][spec["box"][1] : spec["box"][3], spec["box"][0] : spec["box"][2]]
        resized = rpb._resize(np.ascontiguousarray(crop), x1 - x0, y1 - y0)
        patch = bench.images[i, y0:y1, x0:x1]
        assert np.array_equal(patch, resized) or np.array_equal(
            patch, rpb._resize(np.ascontiguousarray(crop[:, ::-1]), x1 - x0, y1 - y0)
        )


def test_whole_photos_have_hand_boxes_inside_the_photos():
    names, photos, boxes, kinds = rpb.whole_photos(CONFIG)
    assert len(names) >= 4 and len(set(kinds.tolist())) == len(names)
    for photo, box in zip(photos, boxes):
        height, width = photo.shape[:2]
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height


def test_acceptable_classes_are_imagenet_names():
    from flaxcam.models import imagenet_class_names

    names = imagenet_class_names()
    for kind, spec in CONFIG["objects"].items():
        for index, name in spec["acceptable"].items():
            assert names[int(index)] == name, (kind, index)
