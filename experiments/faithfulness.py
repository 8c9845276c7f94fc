"""Faithfulness leaderboard of flaxcam's methods on the pretrained EfficientNet-Lite0 (ImageNet) over the
photos that ship with scikit-image and scikit-learn (``flaxcam.demo.sample_photos``: chelsea, coffee,
astronaut, rocket, china, flower), each explained for its predicted class at the default layer
(``head``, 7×7×1280) and scored by every metric of :mod:`flaxcam.evaluation`.

Affordable on a shared 2-core CPU: 6 images, one batch; Score-CAM (1,280 full forward passes per image,
×4 with ADCC's re-explanation and the randomization check), SS-CAM and IS-CAM (×35 / ×10 that) are
replaced by Faster Score-CAM (its 10 highest-variance channels); Grad-CAM++ exact is left out (h·w·C
third-order passes). Metric settings: softmax score, 20 deletion / insertion steps with the zero
baseline (torchcam's defaults), ROAD at 10..90 with noise 0.01, ADCC, and the randomization check with
the classifier ``fc`` re-initialized.

    python -m experiments.faithfulness [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from experiments import common
from flaxcam import evaluation
from flaxcam.data import ArraySource
from flaxcam.demo import sample_photos
from flaxcam.imageio import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from flaxcam.models import pretrained_efficientnet_lite0

METHODS = ["cam", "gradcam", "hirescam", "gradcam_elementwise", "xgradcam", "layercam", "gradcam++", "eigencam",
           "eigengradcam", "kpcacam", "ablationcam", "faster_scorecam", "smoothgradcam++", "shapleycam", "finercam",
           "fullgrad", "randomcam"]
SMOKE_METHODS = ["gradcam", "randomcam"]


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 photos, 2 methods, few steps (CI size)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "results" / "faithfulness")
    args = parser.parse_args(argv)
    photos = sample_photos()
    names = list(photos)[:2] if args.smoke else list(photos)
    source = ArraySource([photos[n] for n in names], ids=names)
    model, variables, meta = pretrained_efficientnet_lite0()
    size = tuple(meta.get("input_size", (224, 224)))
    preprocessing = Preprocessing((int(size[0]), int(size[1])), tuple(meta.get("mean", IMAGENET_MEAN)),
                                  tuple(meta.get("std", IMAGENET_STD)))
    options = {"steps": 5, "percentiles": [30, 70]} if args.smoke else {}
    started = time.perf_counter()
    board = evaluation.evaluate(
        source, model, variables, args.out, preprocessing=preprocessing,
        methods=SMOKE_METHODS if args.smoke else METHODS, metrics="all", batch_size=len(names), options=options,
        method_options=None, resume=False, class_names=meta.get("class_names"), progress=True)
    results = {
        "images": names, "methods": SMOKE_METHODS if args.smoke else METHODS, "options": options,
        "leaderboard": board.table.to_pylist(), "timing": board.timing.to_pylist(),
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": common.provenance("python -m experiments.faithfulness " + " ".join(argv or sys.argv[1:])),
    }
    common.write_json(args.out / "faithfulness.json", results)
    _print_table(board.table.to_pylist())
    return results


def _print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(r["column"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["method"], r["column"]): r["mean"] for r in rows}
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method in methods:
        print(f"| {method} | " + " | ".join(f"{value[(method, c)]:.3f}" if np.isfinite(value[(method, c)]) else "nan"
                                          for c in columns) + " |")


if __name__ == "__main__":
    run()
