"""Experiment 2 — a planted shortcut: do the maps reveal a marker that the model learned instead of the digit?

A small marker (a white square with a black centre) is drawn in one corner of 90% of one class's
training images. A model trained on that data and a twin trained on the same images without markers
(the control) are explained with CAM and Grad-CAM on a test set drawn the same way (markers on 90% of
that class's test images). Scores:

* corner attention: the share of each map's mass inside the corner region (energy-based pointing game
  with the corner as the box), for the map of the predicted class, averaged per true class;
* AUC of that score for marked vs unmarked test images (how well an auditor without labels would find
  the marked images);
* the shortcut itself: how often a marker pasted on test images of *other* classes flips the
  prediction to the marked class.

    python -m experiments.planted_shortcut --config experiments/configs/shortcut.json [--smoke]

Target: the marked class has the highest corner attention and AUC >= 0.95, while the clean twin shows
no such class.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from experiments import common
from flaxcam import metrics
from flaxcam.data import draw_marker


def corner_box(size: tuple[int, int], corner: str, side: int) -> np.ndarray:
    """``[x0, y0, x1, y1]`` of the ``side`` x ``side`` square in ``corner`` of an image of ``size``."""
    height, width = size
    y0 = 0 if corner.startswith("top") else height - side
    x0 = 0 if corner.endswith("left") else width - side
    return np.array([x0, y0, x0 + side, y0 + side], np.float32)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; returns the results dict (also written to the results folder)."""
    args = common.parse_args(__doc__.splitlines()[0], "shortcut.json", argv)
    config = common.load_config(args.config, args.smoke)
    out = common.output_folder(args)
    started = time.perf_counter()
    marker = config["marker"]
    marker_kwargs = {
        "marker_class": marker["class"],
        "marker_fraction": marker["fraction"],
        "marker_corner": marker["corner"],
        "marker_size": marker["size"],
    }
    train_marked = common.digits(config["data"], config["train_count"], seed=0, **marker_kwargs)
    train_clean = common.digits(config["data"], config["train_count"], seed=0)
    test = common.digits(config["data"], config["test_count"], seed=1, **marker_kwargs)
    assert test.marked is not None  # the marker arguments make the canvases record which carry it
    # Markers pasted on every test image of the other classes: does the marker alone change the answer?
    others = test.labels != marker["class"]
    pasted = draw_marker(test.images, others, corner=marker["corner"], size=marker["size"])
    box = corner_box(tuple(config["data"]["size"]), marker["corner"], config["corner_side"])
    boxes = np.broadcast_to(box, (len(test.labels), 4))
    num_classes = len(test.class_names)
    results: dict = {"config": config, "marked_test_images": int(test.marked.sum()), "runs": {}}
    for name, data in (("marked", train_marked), ("clean_twin", train_clean)):
        train_config = common.train_config(config["train"])
        result = common.train_on(train_config, data, out / "runs" / f"shortcut_{name}", progress=not args.no_progress)
        inputs = common.model_inputs(train_config, test.images)
        logits = common.predict(result.model, result.variables, inputs)
        predicted = np.argmax(logits, axis=1)
        run: dict = {}
        for method in config["methods"]:
            maps, _ = common.explain_maps(result.model, result.variables, inputs, predicted, method)
            attention = np.asarray(metrics.energy_in_box(maps, boxes))
            per_class = [float(attention[test.labels == c].mean()) for c in range(num_classes)]
            run[method] = {
                "corner_attention_per_class": per_class,
                "highest_class": int(np.argmax(per_class)),
                "auc_marked_vs_unmarked": float(roc_auc_score(test.marked, attention)),
                "mean_corner_attention_marked": float(attention[test.marked].mean()),
                "mean_corner_attention_unmarked": float(attention[~test.marked].mean()),
            }
        run["accuracy"] = float((predicted == test.labels).mean())
        run["accuracy_unmarked"] = float((predicted == test.labels)[~test.marked].mean())
        pasted_logits = common.predict(
            result.model, result.variables, common.model_inputs(train_config, pasted[others])
        )
        clean_logits = logits[others]
        run["flipped_to_marked_class_by_pasted_marker"] = float(
            ((np.argmax(pasted_logits, 1) == marker["class"]) & (np.argmax(clean_logits, 1) != marker["class"])).mean()
        )
        results["runs"][name] = run
        print(
            f"{name}: accuracy {run['accuracy']:.3f}; "
            + "; ".join(
                f"{m} highest class {run[m]['highest_class']} AUC {run[m]['auc_marked_vs_unmarked']:.3f}"
                for m in config["methods"]
            ),
            file=sys.stderr,
        )
    marked = results["runs"]["marked"]
    results["targets"] = {
        method: {
            "marked_class_highest": marked[method]["highest_class"] == marker["class"],
            "auc>=0.95": marked[method]["auc_marked_vs_unmarked"] >= 0.95,
            "clean_twin_highest_class": results["runs"]["clean_twin"][method]["highest_class"],
        }
        for method in config["methods"]
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["provenance"] = common.provenance(
        "python -m experiments.planted_shortcut " + " ".join(argv or sys.argv[1:])
    )
    common.write_json(out / "planted_shortcut.json", results)
    _figure(out / "planted_shortcut.png", results, config, marker["class"])
    return results


def _figure(path, results, config, marked_class: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = config["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.0), squeeze=False)
    for ax, method in zip(axes[0], methods):
        width = 0.4
        for offset, name, colour in ((-width / 2, "marked", "tab:red"), (width / 2, "clean_twin", "tab:blue")):
            values = results["runs"][name][method]["corner_attention_per_class"]
            ax.bar(
                np.arange(len(values)) + offset,
                values,
                width,
                color=colour,
                label=f"{name.replace('_', ' ')} (AUC {results['runs'][name][method]['auc_marked_vs_unmarked']:.2f})",
            )
        ax.set_xticks(range(len(values)))
        ax.set_xlabel(f"true class (marker on class {marked_class})")
        ax.set_ylabel("corner attention (map mass share)")
        ax.set_title(method.upper())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run()
