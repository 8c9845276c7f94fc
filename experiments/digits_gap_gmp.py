"""Experiment 1 — digits on a canvas: does a GAP head localize better than a GMP head at similar accuracy?

Trains the same small CNN twice on digits-on-a-canvas (ground-truth boxes known), once with global
average pooling (GAP) and once with global max pooling (GMP) before the classifier, then scores CAM and
Grad-CAM maps of the true class on a held-out test set: classification accuracy, localization accuracy
(IoU >= 0.5 between the 20%-rule box and the digit's box; also "top-1": class right too), pointing game
and energy-based pointing game.

    python -m experiments.digits_gap_gmp --config experiments/configs/digits.json [--smoke]

Writes ``NAME.json`` and ``NAME.png`` to the results folder, ``NAME`` being the config's ``name``
(default ``digits_gap_gmp``). A config's ``background_count`` (default 0) adds that many digit-free
canvases to the training set as an eleventh class, ``background``
(:func:`experiments.common.with_background_class`); the test canvases always hold one digit each.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from experiments import common
from flaxcam import localize


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; returns the results dict (also written to the results folder)."""
    args = common.parse_args(__doc__.splitlines()[0], "digits.json", argv)
    config = common.load_config(args.config, args.smoke)
    out = common.output_folder(args)
    started = time.perf_counter()
    name = config.get("name", "digits_gap_gmp")
    train_data = common.training_canvases(config)
    test_data = common.digits(config["data"], config["test_count"], seed=1)
    results: dict = {"config": config, "baselines": _baselines(test_data), "runs": {}}
    figure_rows = []
    for pooling in ("avg", "max"):
        train_config = common.train_config(config["train"], pooling=pooling)
        result = common.train_on(
            train_config, train_data, out / "runs" / _run_name(name, pooling), progress=not args.no_progress
        )
        inputs = common.model_inputs(train_config, test_data.images)
        run: dict = {"pooling": pooling, "train_history": result.history}
        for method in config["methods"]:
            maps, logits = common.explain_maps(result.model, result.variables, inputs, test_data.labels, method)
            correct = (np.argmax(logits, axis=1) == test_data.labels).astype(np.float32)
            run["accuracy"] = float(correct.mean())
            run[method] = common.localization_scores(maps, test_data.boxes, correct)
            run[method]["per_class"] = _per_class(maps, test_data)
            if method == config["methods"][0]:
                figure_rows.append((pooling, method, maps[: config.get("figure_images", 6)]))
        results["runs"][pooling] = run
        print(
            f"{pooling}: accuracy {run['accuracy']:.3f}; "
            + "; ".join(
                f"{m} box {run[m]['box_iou>=0.5']:.3f} point {run[m]['pointing_game']:.3f}" for m in config["methods"]
            ),
            file=sys.stderr,
        )
    gap, gmp = results["runs"]["avg"], results["runs"]["max"]
    results["conclusion"] = {
        f"gap_minus_gmp_{method}_box_iou>=0.5": gap[method]["box_iou>=0.5"] - gmp[method]["box_iou>=0.5"]
        for method in config["methods"]
    } | {
        "gap_minus_gmp_accuracy": gap["accuracy"] - gmp["accuracy"],
        "target_gap_cam_box>=0.90": gap["cam"]["box_iou>=0.5"] >= 0.90,
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["provenance"] = common.provenance("python -m experiments.digits_gap_gmp " + " ".join(argv or sys.argv[1:]))
    common.write_json(out / f"{name}.json", results)
    _figure(out / f"{name}.png", test_data, figure_rows)
    return results


def _run_name(name: str, pooling: str) -> str:
    """Training run folder of a config: ``digits_avg`` / ``digits_max`` for the default config (the
    folders experiment 3 reuses), ``{name}_avg`` / ``{name}_max`` otherwise."""
    return f"{'digits' if name == 'digits_gap_gmp' else name}_{pooling}"


def _per_class(maps: np.ndarray, data) -> dict:
    """Per digit class: box IoU >= 0.5 rate and the median width and height of the 20%-rule box
    relative to the digit's box (how the boxes miss)."""
    from flaxcam import localize as loc

    predicted = np.asarray(loc.boxes(jnp.asarray(maps))).astype(np.float64)
    truth = np.asarray(data.boxes, np.float64)
    hit = np.asarray(loc.box_iou(jnp.asarray(predicted), jnp.asarray(truth))) >= 0.5
    width = (predicted[:, 2] - predicted[:, 0]) / (truth[:, 2] - truth[:, 0])
    height = (predicted[:, 3] - predicted[:, 1]) / (truth[:, 3] - truth[:, 1])
    out = {}
    for c, name in enumerate(data.class_names):
        k = data.labels == c
        out[name] = {
            "box_iou>=0.5": float(hit[k].mean()),
            "median_width_ratio": float(np.median(width[k])),
            "median_height_ratio": float(np.median(height[k])),
            "count": int(k.sum()),
        }
    return out


def _baselines(data) -> dict:
    """Box IoU >= 0.5 of boxes that ignore the image: the whole canvas, and a centred box of the mean
    digit size (how easy the metric is at this canvas/digit scale)."""
    from flaxcam import localize as loc

    height, width = data.images.shape[1:3]
    truth = np.asarray(data.boxes, np.float32)
    whole = np.broadcast_to(np.array([0, 0, width, height], np.float32), truth.shape)
    mean_w, mean_h = (truth[:, 2] - truth[:, 0]).mean(), (truth[:, 3] - truth[:, 1]).mean()
    centre = np.array(
        [(width - mean_w) / 2, (height - mean_h) / 2, (width + mean_w) / 2, (height + mean_h) / 2], np.float32
    )
    centred = np.broadcast_to(centre, truth.shape)
    return {
        "whole_canvas_box_iou>=0.5": float(
            (np.asarray(loc.box_iou(jnp.asarray(whole), jnp.asarray(truth))) >= 0.5).mean()
        ),
        "centred_mean_size_box_iou>=0.5": float(
            (np.asarray(loc.box_iou(jnp.asarray(centred), jnp.asarray(truth))) >= 0.5).mean()
        ),
    }


def _figure(path, data, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = len(rows[0][2])
    fig, axes = plt.subplots(len(rows), count, figsize=(1.8 * count, 2.0 * len(rows)), squeeze=False)
    for r, (pooling, method, maps) in enumerate(rows):
        boxes = np.asarray(localize.boxes(maps))
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(data.images[c])
            ax.imshow(maps[c], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            for box, colour in ((data.boxes[c], "lime"), (boxes[c], "red")):
                x0, y0, x1, y1 = box
                ax.add_patch(
                    Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5)
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{'GAP' if pooling == 'avg' else 'GMP'} {method.upper()}")
    fig.suptitle("digit box (green) and 20%-rule CAM box (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run()
