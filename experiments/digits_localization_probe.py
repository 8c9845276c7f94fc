"""Probe: how well does one GAP (or GMP) CNN's CAM localize on one digits-canvas setting?

A quick exploration tool for experiment 1 (not an experiment of its own, no results file): trains one
model with :func:`experiments.common.train_on` (the same path as ``digits_gap_gmp``), then prints the
box baselines and the localization scores of CAM and Grad-CAM (true class) on ``n_test`` canvases
(the maps are saved as ``maps_{method}.npy`` in the run folder).
The argument is one JSON object: ``name``, ``data`` and ``train`` (as in ``configs/digits.json``, the
model input size is the canvas size), ``n_train``, ``n_test``, optional ``n_background`` (digit-free canvases added to the training set as an
extra class, :func:`experiments.common.with_background_class`), ``pooling`` and ``out``.

    python -m experiments.digits_localization_probe '{"name": "p", "n_train": 3000, "n_test": 300, "data": {...}, "train": {...}}'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments import common
from experiments.digits_gap_gmp import _baselines


def main(spec: dict) -> None:
    """Train one model on ``spec``'s data and print its baselines and CAM / Grad-CAM localization scores."""
    test = common.digits(spec["data"], spec.get("n_test", 300), seed=1)
    print("baselines", _baselines(test), flush=True)
    train_data = common.digits(spec["data"], spec.get("n_train", 1000), seed=0)
    train_data = common.with_background_class(train_data, spec["data"], spec.get("n_background", 0), seed=0)
    config = common.train_config(spec["train"], pooling=spec.get("pooling", "avg"), input_size=spec["data"]["size"])
    started = time.perf_counter()
    out = Path(spec.get("out", "/tmp/digits_probe")) / spec["name"]
    result = common.train_on(config, train_data, out, progress=False)
    print(f"training: {time.perf_counter() - started:.0f}s", flush=True)
    inputs = common.model_inputs(config, test.images)
    for method in ("cam", "gradcam"):
        maps, logits = common.explain_maps(result.model, result.variables, inputs, test.labels, method)
        np.save(out / f"maps_{method}.npy", maps.astype(np.float16))  # for a failure analysis
        correct = (np.argmax(logits, 1) == test.labels).astype(np.float32)  # a digit called "background" is wrong
        print(
            spec["name"],
            method,
            f"accuracy {correct.mean():.3f}",
            common.localization_scores(maps, test.boxes, correct),
            flush=True,
        )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
