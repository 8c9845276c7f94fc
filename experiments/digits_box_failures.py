"""Failure analysis of a digits localization probe: why do the 20%-rule boxes miss the ink box?

Reads the CAM maps a probe saved (``maps_cam.npy`` in its run folder; computed from the run's
``model.msgpack`` when missing) for the probe's test canvases (seed 1), and prints: the box hit rate
at thresholds 0.1 / 0.2 / 0.3 of the maximum (a diagnosis only: the metric stays at 20%), the misses
split into too large (box area > 1.4x the ink box), too small (< 0.7x) and offset (about the right
area), the median width and height ratios (box / ink box), and the hit rate per class.

    python -m experiments.digits_box_failures RUN_DIR --size 64 64 --digit-size 20 32 [--n-test 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments import common
from flaxcam import localize


def saved_or_computed_maps(run: Path, data: dict, count: int) -> np.ndarray:
    """The run's saved CAM maps, or the CAM maps of its bundle on the probe's test canvases."""
    path = run / "maps_cam.npy"
    if path.exists():
        return np.load(path).astype(np.float32)
    from flaxcam.models import load_bundle

    model, variables, _ = load_bundle(run / "model.msgpack")
    config = common.train_config(json.loads((run / "config.json").read_text()))
    test = common.digits(data, count, seed=1)
    maps, _ = common.explain_maps(model, variables, common.model_inputs(config, test.images), test.labels, "cam")
    np.save(path, maps.astype(np.float16))
    return maps


def main() -> None:
    """Print the failure analysis of one probe run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 64])
    parser.add_argument("--digit-size", type=int, nargs=2, default=[20, 32])
    parser.add_argument("--clutter-lines", type=int, default=3)
    parser.add_argument(
        "--n-test", type=int, default=None, help="test canvases (default: as many as the saved maps, else 300)"
    )
    args = parser.parse_args()
    data = {"size": args.size, "digit_size": args.digit_size, "clutter_lines": args.clutter_lines}
    saved = args.run / "maps_cam.npy"
    saved_count = len(np.load(saved, mmap_mode="r")) if saved.exists() else None
    count = args.n_test or saved_count or 300
    if saved_count is not None and saved_count != count:
        parser.error(
            f"{saved} holds maps of {saved_count} test canvases, not --n-test {count}; drop --n-test or delete the file"
        )
    test = common.digits(data, count, seed=1)
    maps = saved_or_computed_maps(args.run, data, count)
    truth = test.boxes.astype(np.float32)
    for threshold in (0.1, 0.2, 0.3):
        hits = np.asarray(localize.box_iou(localize.boxes(jnp.asarray(maps), threshold), jnp.asarray(truth))) >= 0.5
        print(f"threshold {threshold}: box IoU >= 0.5 for {hits.mean():.3f}")
    boxes = np.asarray(localize.boxes(jnp.asarray(maps), 0.2)).astype(np.float32)
    miss = np.asarray(localize.box_iou(jnp.asarray(boxes), jnp.asarray(truth))) < 0.5
    width = (boxes[:, 2] - boxes[:, 0]) / (truth[:, 2] - truth[:, 0])
    height = (boxes[:, 3] - boxes[:, 1]) / (truth[:, 3] - truth[:, 1])
    area = width * height
    print(
        f"misses {miss.sum()} of {len(miss)}: too large {np.sum(miss & (area > 1.4))}, too small {np.sum(miss & (area < 0.7))}, "
        f"offset {np.sum(miss & (area >= 0.7) & (area <= 1.4))}"
    )
    print(
        f"median width / height ratio: all {np.median(width):.2f} / {np.median(height):.2f}, misses {np.median(width[miss]):.2f} / {np.median(height[miss]):.2f}"
    )
    print("hit rate per class:", {c: round(float((~miss)[test.labels == c].mean()), 2) for c in range(10)})


if __name__ == "__main__":
    main()
