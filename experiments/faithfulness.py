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

Extended run (``--real-photos N --methods extended``): the same six photos plus the first ``N`` pasted-object
images of :mod:`experiments.real_photo_boxes` (``configs/real_photo_boxes.json``, seed 0: kinds round-robin,
so ``N = 10`` gives two each of cat, cup, rocket, motorcycle, building on random textures; generated
offline from the scikit-image photos), with every method whose cost does not scale with the channel count
(:data:`EXTENDED_METHODS`). Left out for time: Score-CAM, SS-CAM, IS-CAM and Ablation-CAM (1,280 forward
passes per image at ``head``, ×35 for SS-CAM / IS-CAM, paid again by ADCC and the randomization check),
Grad-CAM++ exact (h·w·C third-order passes) and SESS (multi-scale patch grid).

Digits-canvas run (``--digits N``): the GAP-head CNN of ``configs/digits_localization.json`` (the model
whose CAM boxes :mod:`experiments.real_photo_boxes` scores on the digits canvases; trained here in
``OUT/model``, reused on a rerun) over the first ``N`` test canvases (seed 1, 64×64, 16×16 maps at the
last layer), with every method but the costliest and the inapplicable ones (:func:`digits_methods`).

    python -m experiments.faithfulness [--smoke] [--out DIR] [--real-photos N [--no-photos] | --digits N]
        [--methods default|extended|m1,m2] [--batch-size B] [--limit N] [--summary-only]
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
EXTENDED_METHODS = [
    *METHODS[:7],
    "gradcam_elementwise",
    "eigengradcam",
    "kpcacam",
    "segeigencam",
    "fem",
    "dff",
    "shapleycam",
    "finercam",
    "refinecam",
    "smoothgradcam++",
    "fullgrad",
    "guided_backprop",
    "faster_scorecam",
    "randomcam",
]
SMOKE_METHODS = ["gradcam", "randomcam"]
#: The digits run: every registered method except LeGrad (vision transformers only), SESS (a multi-scale
#: patch grid around another method) and Grad-CAM++ exact (h·w·C third-order passes: 32,768 per image here).
DIGITS_LEFT_OUT = ("legrad", "sess", "gradcam++exact")


def digits_methods() -> list[str]:
    """:data:`flaxcam.METHODS` less :data:`DIGITS_LEFT_OUT`, in registry order."""
    from flaxcam import METHODS

    return [m for m in METHODS if m not in DIGITS_LEFT_OUT]


def digits_setup(count: int, out: Path, smoke: bool):
    """``(source, model, variables, preprocessing, class_names)`` of the digits run: the model of
    ``configs/digits_localization.json`` (its smoke size with ``smoke``) trained on its canvases in
    ``out/model`` (a finished run there is reused), and the first ``count`` test canvases (seed 1)."""
    config = common.load_config(common.ROOT / "configs" / "digits_localization.json", smoke)
    train_data = common.training_canvases(config)
    train = common.train_config(config["train"])
    result = common.train_on(train, train_data, out / "model", progress=False)
    test = common.digits(config["data"], count, seed=1)
    source = ArraySource(
        test.images,
        labels=test.labels,
        class_names=train_data.class_names,
        boxes=test.boxes,
        ids=[f"canvas-{i:04d}" for i in range(count)],
    )
    size = (int(train.input_size[0]), int(train.input_size[1]))
    (m0, m1, m2), (s0, s1, s2) = train.mean, train.std
    preprocessing = Preprocessing(size, (m0, m1, m2), (s0, s1, s2))
    return source, result.model, result.variables, preprocessing, list(train_data.class_names)


def pasted_objects(count: int) -> tuple[list[np.ndarray], list[str]]:
    """The first ``count`` pasted-object images of ``configs/real_photo_boxes.json`` and their ids
    (``pasted-0003-motorcycle``)."""
    import json

    from experiments import real_photo_boxes

    config = json.loads((common.ROOT / "configs" / "real_photo_boxes.json").read_text())
    config["count"] = count  # the generator is sequential in its seed: the first images do not depend on count
    bench = real_photo_boxes.make_benchmark(config)
    ids = [f"pasted-{i:04d}-{real_photo_boxes.KINDS_ORDER[k]}" for i, k in enumerate(bench.kinds)]
    return list(bench.images), ids


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 photos, 2 methods, few steps (CI size)")
    parser.add_argument(
        "--out", type=Path, help="default results/faithfulness, results/faithfulness_real with --real-photos"
    )
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    parser.add_argument("--real-photos", type=int, default=0, help="add the first N pasted-object images")
    parser.add_argument("--no-photos", action="store_true", help="leave out the six bundled photos")
    parser.add_argument(
        "--digits", type=int, default=0, help="the digits-canvas model over its first N test canvases instead"
    )
    parser.add_argument("--methods", default="default", help="default, extended or a comma-separated list")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch (the unit of resuming)")
    parser.add_argument("--limit", type=int, help="score at most this many more images now (0: summarize)")
    parser.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the scores in --out")
    args = parser.parse_args(argv)
    if args.digits and args.real_photos:
        parser.error("--digits replaces the photos: give --digits or --real-photos, not both")
    folder = "faithfulness_digits" if args.digits else "faithfulness_real" if args.real_photos else "faithfulness"
    args.out = args.out or common.ROOT / "results" / folder
    if args.summary_only:
        text = summary(args.out)
        (args.out / "summary.md").write_text(text)
        print(text)
        return {}
    if args.smoke:
        methods = SMOKE_METHODS
    elif args.digits and args.methods == "default":
        methods = digits_methods()
    else:
        methods = {"default": METHODS, "extended": EXTENDED_METHODS}.get(args.methods) or args.methods.split(",")
    if args.digits:
        source, model, variables, preprocessing, class_names = digits_setup(args.digits, args.out, args.smoke)
        names = list(source.ids)
    else:
        photos = sample_photos()
        names = [] if args.no_photos else list(photos)[:2] if args.smoke else list(photos)
        images = [photos[n] for n in names]
        if args.real_photos:
            pasted, pasted_ids = pasted_objects(args.real_photos)
            images, names = images + pasted, names + pasted_ids
        source = ArraySource(images, ids=names)
        model, variables, meta = pretrained_efficientnet_lite0()
        size = tuple(meta.get("input_size", (224, 224)))
        preprocessing = Preprocessing(
            (int(size[0]), int(size[1])), tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD))
        )
        class_names = meta.get("class_names")
    options = {"steps": 5, "percentiles": [30, 70]} if args.smoke else {"steps": 10, "percentiles": [20, 40, 60, 80]}
    started = time.perf_counter()
    board = evaluation.evaluate(
        source,
        model,
        variables,
        args.out,
        preprocessing=preprocessing,
        methods=methods,
        metrics="all",
        batch_size=args.batch_size,
        options=options,
        method_options=None,
        resume=not args.restart,
        limit=args.limit,
        class_names=class_names,
        progress=True,
    )
    results = {
        "images": names,
        "images_scored": board.images,
        "methods": methods,
        "options": options,
        "batch_size": args.batch_size,
        "leaderboard": board.table.to_pylist(),
        "timing": board.timing.to_pylist(),
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": common.provenance("python -m experiments.faithfulness " + " ".join(argv or sys.argv[1:])),
    }
    common.write_json(args.out / "faithfulness.json", results)
    text = summary(args.out)
    (args.out / "summary.md").write_text(text)
    print(text)
    return results


# (column, header, lower is better)
COLUMNS = [
    ("deletion_auc", "deletion AUC ↓", True),
    ("insertion_auc", "insertion AUC ↑", False),
    ("road_morf", "ROAD MoRF ↓", True),
    ("road_lerf", "ROAD LeRF ↑", False),
    ("road_combined", "ROAD combined ↑", False),
    ("average_drop", "Average Drop ↓", True),
    ("increase_in_confidence", "Increase in Conf. ↑", False),
    ("adcc", "ADCC ↑", False),
    ("coherency", "coherency ↑", False),
    ("complexity", "complexity ↓", True),
    ("randomization_rank_correlation", "rank corr. after randomizing the classifier ↓", True),
]
# pairs of columns that should rank methods the same way if both measure faithfulness
AGREEMENT = [("road_morf", "road_lerf"), ("deletion_auc", "insertion_auc"), ("road_combined", "insertion_auc")]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def summary(out_dir: Path) -> str:
    """Markdown: per-method means of every metric over all images and over each image group (the bundled
    photos, the pasted objects), 95% bootstrap intervals of insertion AUC and ROAD combined, seconds per
    image, and how well pairs of metrics agree on the ranking of the real methods (Spearman over the
    methods' means, signs aligned so that +1 means the same order; ``randomcam`` left out)."""
    import pyarrow.parquet as pq

    from flaxcam.evaluation.leaderboard import bootstrap_interval

    scores = pq.read_table(out_dir / "scores.parquet").to_pylist()
    methods = list(dict.fromkeys(r["method"] for r in scores))
    groups = {"all images": lambda i: True}
    pasted = {str(r["id"]).startswith("pasted-") for r in scores}
    if pasted == {True, False}:  # both kinds of image: their means separately too
        groups["bundled photos"] = lambda i: not str(i).startswith("pasted-")
        groups["pasted objects"] = lambda i: str(i).startswith("pasted-")
    lines: list[str] = []
    means: dict[str, dict[str, dict[str, float]]] = {}
    for group, keep in groups.items():
        rows = [r for r in scores if keep(r["id"])]
        count = len({r["id"] for r in rows})
        means[group] = {
            m: {c: float(np.nanmean([r[c] for r in rows if r["method"] == m])) for c, _, _ in COLUMNS} for m in methods
        }
        lines += [f"**{group}** ({count} images), means:", ""]
        lines.append("| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{means[group][m][c]:.3f}" for c, _, _ in COLUMNS) + " |")
        lines.append("")
    lines.append("95% bootstrap intervals over all images (1,000 resamples):")
    lines.append("")
    for column in ("insertion_auc", "road_combined"):
        cells = []
        for m in methods:
            mean, low, high = bootstrap_interval(np.asarray([r[column] for r in scores if r["method"] == m]))
            cells.append(f"{m} {mean:.3f} [{low:.2f}, {high:.2f}]")
        lines += [f"* {column}: " + ", ".join(cells), ""]
    steps = ["explain", "confidence", "deletion_insertion", "road", "adcc", "randomization"]
    lines.append("| method | " + " | ".join(f"{s} (s/image)" for s in steps) + " |")
    lines.append("|---" * (len(steps) + 1) + "|")
    for m in methods:
        seconds = [float(np.median([r[f"seconds_{s}"] for r in scores if r["method"] == m])) for s in steps]
        lines.append(f"| {m} | " + " | ".join(f"{c:.2f}" for c in seconds) + " |")
    lines += ["", "Ranking agreement of the real methods (Spearman of the method means, +1 = same order):", ""]
    real = [m for m in methods if m != "randomcam"]
    lower = {c: low for c, _, low in COLUMNS}
    for group in groups:
        cells = []
        for a, b in AGREEMENT:
            va = np.asarray([means[group][m][a] * (-1 if lower[a] else 1) for m in real])
            vb = np.asarray([means[group][m][b] * (-1 if lower[b] else 1) for m in real])
            cells.append(f"{a} vs {b} {_spearman(va, vb):+.2f}")
        lines += [f"* {group}: " + ", ".join(cells), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run()
