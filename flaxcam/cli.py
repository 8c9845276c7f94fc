"""The ``flaxcam`` command line (typer)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# Listed here so that `--help` does not import JAX; tests/test_cli.py checks it against flaxcam.METHODS.
METHOD_NAMES = (
    "ablationcam, cam, eigencam, eigengradcam, faster_scorecam, finercam, fullgrad, gradcam, gradcam++, "
    "gradcam++exact, gradcam_elementwise, hirescam, iscam, kpcacam, layercam, randomcam, scorecam, shapleycam, "
    "smoothgradcam++, sscam, xgradcam"
)
_METHOD_HELP = f"Explanation method, one of: {METHOD_NAMES}."

app = typer.Typer(
    help="flaxcam: class activation maps for JAX/Flax models.", no_args_is_help=True, add_completion=False
)


@app.callback()
def _main() -> None:
    """flaxcam: class activation maps (CAM, Grad-CAM, ...) for JAX/Flax models."""


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _load_model(model_name: str | None, weights: Path | None):
    """(model, variables, meta): a flaxcam bundle, a torchvision ResNet checkpoint, the pretrained
    default (EfficientNet-Lite0, ImageNet) or a registry model with random weights."""
    from flaxcam import models

    if weights is not None:
        if Path(weights).suffix in (".pth", ".pt"):  # a torchvision ResNet checkpoint, read without torch
            model, variables = models.load_torchvision_resnet(weights)
            meta = {"input_size": [224, 224], "class_names": list(models.imagenet_class_names())}
            return model, variables, meta
        model, variables, meta = models.load_bundle(weights)
        return model, variables, dict(meta or {})
    if model_name is None or model_name == "efficientnet_lite0":
        model, variables, meta = models.pretrained_efficientnet_lite0()
        return model, variables, dict(meta)
    if model_name not in models.MODELS:
        raise typer.BadParameter(f"unknown model {model_name!r}; models: {', '.join(sorted(models.MODELS))}")
    model = models.create_model(model_name)
    _say(f"warning: {model_name} with RANDOM weights (no --weights given): the maps are not meaningful")
    variables = models.init_variables(model, (1, 224, 224, 3))
    return model, variables, {"input_size": [224, 224]}


def _unique_figure_path(out: Path, stem: str, method: str, taken: set[Path]) -> Path:
    path = out / f"{stem}_{method}.png"
    index = 1
    while path in taken:
        path = out / f"{stem}-{index}_{method}.png"
        index += 1
    taken.add(path)
    return path


def run_explain(
    images: Sequence[Path],
    *,
    model_name: str | None = None,
    weights: Path | None = None,
    method: str = "gradcam",
    layer: str | None = None,
    top_k: int = 3,
    out: Path = Path("flaxcam_out"),
    json_path: Path | None = None,
    batch_size: int = 16,
    alpha: float = 0.5,
    threshold: float = 0.2,
    labels: Sequence[int | None] | None = None,
    progress: bool | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Explain image files and write one seed-style figure per image (and a JSON summary).

    Returns ``(records, errors)``; unreadable files are reported in ``errors`` and skipped, the others
    are still processed. ``labels`` optionally gives each image's true class for the figure.
    """
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    import flaxcam
    from flaxcam import colormap, localize, viz
    from flaxcam.imageio import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, Preprocessing, read_image

    model, variables, meta = _load_model(model_name, weights)
    size = tuple(meta.get("input_size", (224, 224)))
    preprocessing = Preprocessing(
        size=(int(size[0]), int(size[1])),
        mean=tuple(meta.get("mean", IMAGENET_MEAN)),
        std=tuple(meta.get("std", IMAGENET_STD)),
    )
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    taken: set[Path] = set()
    show_progress = len(images) > batch_size if progress is None else progress
    labels = list(labels) if labels is not None else [None] * len(images)
    num_classes = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, *size, 3), np.float32)).shape[-1]
    k = max(1, min(top_k, num_classes))

    with tqdm(total=len(images), desc=f"explain ({method})", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk_paths, chunk_images, chunk_labels = [], [], []
            for path, label in zip(images[start : start + batch_size], labels[start : start + batch_size]):
                try:
                    chunk_images.append(read_image(path))
                    chunk_paths.append(Path(path))
                    chunk_labels.append(label)
                except ImageReadError as error:
                    _say(f"error: {error}")
                    errors.append({"file": str(path), "error": str(error)})
            if not chunk_images:
                bar.update(len(images[start : start + batch_size]))
                continue
            resized, inputs = preprocessing(chunk_images)
            explanation = flaxcam.explain(model, variables, inputs, method=method, layer=layer, top_k=k)
            first = explanation.maps[:, 0]
            boxes = localize.boxes(first, threshold=threshold)
            overlays = colormap.overlay(jax.numpy.asarray(resized), first, alpha=alpha)
            host = jax.device_get(
                {"probabilities": explanation.probabilities, "targets": explanation.targets, "boxes": boxes, "overlays": overlays}
            )
            class_names = meta.get("class_names") or [str(i) for i in range(host["probabilities"].shape[1])]
            for i, path in enumerate(chunk_paths):
                original = chunk_images[i]
                scale = np.array([original.shape[1] / size[1], original.shape[0] / size[0]] * 2)
                box_input = host["boxes"][i]
                box = [int(round(v)) for v in (box_input * scale)]
                probabilities = host["probabilities"][i]
                top = [
                    {"class": int(c), "name": class_names[int(c)], "probability": float(probabilities[int(c)])}
                    for c in host["targets"][i]
                ]
                figure = viz.seed_figure(
                    original,
                    probabilities,
                    class_names,
                    true_label=chunk_labels[i],
                    preprocessed=inputs[i],
                    overlay=host["overlays"][i],
                    box=box_input,
                    title=f"{method} · {explanation.layer}",
                )
                figure_path = _unique_figure_path(out, path.stem, method, taken)
                viz.save_figure(figure, figure_path)
                records.append(
                    {
                        "file": str(path),
                        "figure": str(figure_path),
                        "top_k": top,
                        "target": top[0],
                        "box": box,
                        "method": method,
                        "layer": explanation.layer,
                    }
                )
            bar.update(len(images[start : start + batch_size]))

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"images": records, "errors": errors}, indent=2))
    return records, errors


@app.command("explain")
def explain_command(
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    model: Annotated[
        Optional[str],
        typer.Option(help="Default: efficientnet_lite0 with ImageNet weights. Another registry name runs random weights."),
    ] = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(help="A flaxcam bundle (.msgpack, e.g. from `make demo`) or a torchvision ResNet checkpoint (.pth)."),
    ] = None,
    method: Annotated[str, typer.Option(help=_METHOD_HELP)] = "gradcam",
    layer: Annotated[Optional[str], typer.Option(help="Target layer (default: the last spatial layer).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes listed per image; maps for each.")] = 3,
    out: Annotated[Path, typer.Option(help="Folder for the figures.")] = Path("flaxcam_out"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write a JSON summary here.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per jitted call.")] = 16,
    threshold: Annotated[float, typer.Option(help="Box threshold, a fraction of each map's maximum.")] = 0.2,
) -> None:
    """Explain IMAGES: one figure per image (input + top-3, preprocessed, overlay with box)."""
    records, errors = run_explain(
        images,
        model_name=model,
        weights=weights,
        method=method,
        layer=layer,
        top_k=top_k,
        out=out,
        json_path=json_path,
        batch_size=batch_size,
        threshold=threshold,
    )
    for record in records:
        target = record["target"]
        typer.echo(f"{record['file']}: {target['name']} (p={target['probability']:.3f}) box={record['box']} -> {record['figure']}")
    if errors:
        _say(f"{len(errors)} of {len(images)} file(s) could not be read")
        raise typer.Exit(code=1)


def _preprocessing_of(meta: dict[str, Any]):
    from flaxcam.imageio import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

    size = tuple(meta.get("input_size", (224, 224)))
    return Preprocessing(
        size=(int(size[0]), int(size[1])),
        mean=tuple(meta.get("mean", IMAGENET_MEAN)),
        std=tuple(meta.get("std", IMAGENET_STD)),
    )


@app.command("audit")
def audit_command(
    source: Annotated[str, typer.Argument(help="folder:PATH | ham10000:PATH | tfds:NAME[:SPLIT] | npz:PATH")],
    out: Annotated[Path, typer.Option(help="Audit directory (Parquet parts + manifest); rerun to resume.")],
    model: Annotated[Optional[str], typer.Option(help="As for `flaxcam explain`.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="A flaxcam bundle (.msgpack) or a torchvision ResNet checkpoint (.pth).")] = None,
    method: Annotated[str, typer.Option(help=_METHOD_HELP)] = "cam",
    layer: Annotated[Optional[str], typer.Option(help="Target layer (default: the last spatial layer).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per jitted call.")] = 64,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes recorded per image.")] = 3,
    target: Annotated[str, typer.Option(help="Class explained: predicted | label.")] = "predicted",
    resume: Annotated[bool, typer.Option(help="Resume an existing audit in --out (--no-resume starts over).")] = True,
    limit: Annotated[Optional[int], typer.Option(help="Audit at most this many remaining images now.")] = None,
    workers: Annotated[int, typer.Option(help="grain reader processes (0: a thread).")] = 0,
    coordinator: Annotated[Optional[str], typer.Option(help="Multi-process run: HOST:PORT of process 0 (or 'auto': detect a TPU pod / SLURM / Open MPI; untested). Run the same command once per process.")] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="Multi-process run: number of processes.")] = None,
    process_id: Annotated[Optional[int], typer.Option(help="Multi-process run: this process's id, 0..N-1.")] = None,
) -> None:
    """Audit every image of SOURCE: predictions, boxes, attention statistics and maps, in Parquet."""
    from flaxcam import audit, distributed
    from flaxcam.audit.errors import AuditError

    distributed.initialize(coordinator, num_processes, process_id)  # before any JAX computation
    loaded_model, variables, meta = _load_model(model, weights)
    try:
        result = audit.run(
            source, loaded_model, variables, out, preprocessing=_preprocessing_of(meta), method=method, layer=layer,
            batch_size=batch_size, top_k=top_k, target=target, resume=resume, limit=limit, worker_count=workers,
            class_names=meta.get("class_names"),
            model_info={"model": model or ("bundle" if weights else "efficientnet_lite0"), "weights": str(weights) if weights else None},
        )
    except AuditError as error:  # disk full, folder in use, other settings: one line, nothing lost
        _say(f"error: {error}")
        raise typer.Exit(code=2) from None
    state = "complete" if result.complete else "incomplete"
    typer.echo(
        f"{out}: {result.rows} images, {result.errors} unreadable, of {result.total} ({state}); this run: "
        f"{result.processed} images in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)"
    )


@app.command("report")
def report_command(
    audit_dir: Annotated[Path, typer.Argument(help="An audit directory written by `flaxcam audit`.")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file (default AUDIT_DIR/report.html).")] = None,
    gallery_size: Annotated[int, typer.Option(help="Images per gallery.")] = 12,
) -> None:
    """Write one self-contained HTML report of an audit (classes ranked by unusual attention)."""
    from flaxcam.audit.report import write_report

    typer.echo(str(write_report(audit_dir, out, gallery_size=gallery_size)))


@app.command("query")
def query_command(
    audit_dir: Annotated[Path, typer.Argument(help="An audit directory written by `flaxcam audit`.")],
    sql: Annotated[str, typer.Argument(help="DuckDB SQL over the views `audit`, `errors` and the table `classes`.")],
    allow_files: Annotated[bool, typer.Option("--allow-files", help="Let the SQL read and write other files (off: only the audit's parts).")] = False,
) -> None:
    """Run SQL over an audit, e.g. "SELECT label, avg(corner_max_share) FROM audit GROUP BY 1"."""
    import duckdb

    from flaxcam.audit.query import format_table, query

    try:
        columns, rows = query(audit_dir, sql, allow_files=allow_files)
    except duckdb.PermissionException as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"query failed: {first_line} (only the audit's own files can be read; --allow-files lifts this)") from None
    except duckdb.Error as error:
        raise ValueError(f"query failed: {error}") from None
    typer.echo(format_table(columns, rows))


@app.command("train")
def train_command(
    source: Annotated[str, typer.Argument(help="Training data: folder:PATH, ham10000:PATH, tfds:NAME[:SPLIT] or npz:PATH.")],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoints/, history.json, model.msgpack.")] = Path("flaxcam_train"),
    val: Annotated[Optional[str], typer.Option(help="Evaluation data (same spec forms), scored after each epoch.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="JSON file with TrainConfig keys; the options below override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Registry model: small_cnn, resnet18, resnet34, resnet50, vgg16, efficientnet_lite0.")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option(help='Model constructor arguments as JSON, e.g. \'{"features": [16, 32, 64]}\'.')] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Global pooling before the classifier: avg (GAP) or max (GMP).")] = None,
    size: Annotated[Optional[str], typer.Option(help="Model input size H,W (images are resized), e.g. 224,224.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warmup + cosine).")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips.")] = None,
    shift: Annotated[Optional[int], typer.Option(help="Random shifts of up to this many pixels.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (0: each epoch's end only).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation, data order and augmentation.")] = None,
    restart: Annotated[bool, typer.Option(help="Start over instead of resuming from OUT's latest checkpoint.")] = False,
    workers: Annotated[int, typer.Option(help="grain worker processes for reading images (0: in this process).")] = 0,
) -> None:
    """Train a GAP/GMP-head classifier on SOURCE; rerun the same command to resume after an interruption.

    The final bundle OUT/model.msgpack loads straight into `flaxcam explain --weights`."""
    from flaxcam.train import TrainConfig, train

    values: dict[str, Any] = json.loads(config.read_text()) if config is not None else {}
    overrides = {
        "model": model,
        "model_kwargs": json.loads(model_kwargs) if model_kwargs is not None else None,
        "pooling": pooling,
        "input_size": [int(v) for v in size.split(",")] if size is not None else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "flip": flip,
        "shift": shift,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    run_config = TrainConfig.from_dict(values)
    try:
        result = train(run_config, source, out=out, eval_data=val, resume=not restart, worker_count=workers, log=_say)
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items())
    typer.echo(f"trained {result.steps} steps ({summary}) -> {result.bundle}")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except (ValueError, FileNotFoundError) as error:  # user errors (DistributedSetupError included): bad layer, method, targets, paths
        _say(f"error: {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
