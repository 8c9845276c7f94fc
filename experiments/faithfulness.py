"""Faithfulness leaderboard of flaxcam's methods on the pretrained EfficientNet-Lite0 (ImageNet) over the
photos that ship with scikit-image and scikit-learn (``flaxcam.demo.sample_photos``: chelsea, coffee,
astronaut, rocket, china, flower), each explained for its predicted class at the default layer
(``head``, 7×7×1280) and scored by every metric of :mod:`flaxcam.evaluation`.

Affordable on a shared 2-core CPU (load average ~20 when it ran): 6 images in batches of 2 (resumable),
10 methods — the main single-pass CAM variants, Eigen-CAM, Ablation-CAM, Faster Score-CAM (its 10
highest-variance channels, standing in for Score-CAM: 1,280 full forward passes per image, ×4 with ADCC's
re-explanation and the randomization check) and the random baseline. Left out for time: SS-CAM, IS-CAM,
Score-CAM, Grad-CAM++ exact (h·w·C third-order passes), FullGrad, SmoothGrad-CAM++, ShapleyCAM, FinerCAM,
the elementwise / Eigen-Grad / KPCA variants. Metric settings (reduced): softmax score, 10 deletion /
insertion steps with the zero baseline, ROAD at 20, 40, 60, 80 (pytorch-grad-cam's ARCC percentiles)
with noise 0.01, ADCC, and the randomization check with the classifier re-initialized.

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

METHODS = [
    "cam",
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "eigencam",
    "ablationcam",
    "faster_scorecam",
    "randomcam",
]
SMOKE_METHODS = ["gradcam", "randomcam"]


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 photos, 2 methods, few steps (CI size)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "results" / "faithfulness")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)
    photos = sample_photos()
    names = list(photos)[:2] if args.smoke else list(photos)
    source = ArraySource([photos[n] for n in names], ids=names)
    model, variables, meta = pretrained_efficientnet_lite0()
    size = tuple(meta.get("input_size", (224, 224)))
    preprocessing = Preprocessing(
        (int(size[0]), int(size[1])), tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD))
    )
    options = {"steps": 5, "percentiles": [30, 70]} if args.smoke else {"steps": 10, "percentiles": [20, 40, 60, 80]}
    started = time.perf_counter()
    board = evaluation.evaluate(
        source,
        model,
        variables,
        args.out,
        preprocessing=preprocessing,
        methods=SMOKE_METHODS if args.smoke else METHODS,
        metrics="all",
        batch_size=2,
        options=options,
        method_options=None,
        resume=not args.restart,
        class_names=meta.get("class_names"),
        progress=True,
    )
    results = {
        "images": names,
        "methods": SMOKE_METHODS if args.smoke else METHODS,
        "options": options,
        "leaderboard": board.table.to_pylist(),
        "timing": board.timing.to_pylist(),
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
        print(
            f"| {method} | "
            + " | ".join(f"{value[(method, c)]:.3f}" if np.isfinite(value[(method, c)]) else "nan" for c in columns)
            + " |"
        )


if __name__ == "__main__":
    run()
