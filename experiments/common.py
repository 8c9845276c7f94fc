"""Helpers shared by the experiments: configs, digits data, training through :func:`flaxcam.train.train`,
maps and localization scores in batches, results files."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flaxcam
from flaxcam import metrics
from flaxcam.data import DigitCanvases, make_background_canvases, make_digit_canvases
from flaxcam.train import ArrayFeed, TrainConfig, TrainResult, train

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def parse_args(description: str, default_config: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--config FILE`` (JSON), ``--smoke`` (the config's ``smoke`` overrides: CI size), ``--out DIR``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / default_config)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI (the config's 'smoke' overrides)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default experiments/results, or a temp-like folder with --smoke)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def load_config(path: Path, smoke: bool) -> dict[str, Any]:
    """A JSON config; with ``smoke`` its ``"smoke"`` section is merged over it (nested dicts merged)."""
    config = json.loads(Path(path).read_text())
    overrides = config.pop("smoke", {})
    return _merge(config, overrides) if smoke else config


def _merge(base: dict, overrides: Mapping) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merge(base[key], value) if isinstance(value, Mapping) and isinstance(base.get(key), Mapping) else value
        )
    return merged


def output_folder(args: argparse.Namespace) -> Path:
    """Where results go: ``--out``, else ``experiments/results`` (``experiments/results/smoke`` with ``--smoke``)."""
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    return out


def digits(spec: Mapping[str, Any], count: int, seed: int, **extra: Any) -> DigitCanvases:
    """Digit canvases from a config's ``data`` section (``size``, ``digit_size``, ``clutter_lines``, ...)."""
    return make_digit_canvases(
        count, seed=seed, **_canvas_kwargs(spec, ("size", "digit_size", "clutter_lines", "noise")), **extra
    )


def _canvas_kwargs(spec: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The ``keys`` present in a config's ``data`` section, JSON lists as tuples."""
    return {k: tuple(spec[k]) if isinstance(spec[k], list) else spec[k] for k in keys if k in spec}


#: Class name of the digit-free canvases added by :func:`with_background_class`.
BACKGROUND_CLASS = "background"


def with_background_class(data: DigitCanvases, spec: Mapping[str, Any], count: int, seed: int) -> DigitCanvases:
    """``data`` plus ``count`` digit-free canvases drawn like it (:func:`flaxcam.data.make_background_canvases`,
    the ``data`` section's ``size``, ``clutter_lines``, ``noise``) as an extra class ``"background"``
    (label ``len(data.class_names)``, an empty box ``[0, 0, 0, 0]``), shuffled in with a fixed seed."""
    if count <= 0:
        return data
    empty = make_background_canvases(count, seed=seed, **_canvas_kwargs(spec, ("size", "clutter_lines", "noise")))
    order = np.random.default_rng([seed, 3]).permutation(len(data.labels) + count)
    images = np.concatenate([data.images, empty])[order]
    labels = np.concatenate([data.labels, np.full(count, len(data.class_names), data.labels.dtype)])[order]
    boxes = np.concatenate([data.boxes, np.zeros((count, 4), data.boxes.dtype)])[order]
    marked = np.concatenate([data.marked, np.zeros(count, bool)])[order]
    return DigitCanvases(
        images=images, labels=labels, boxes=boxes, class_names=(*data.class_names, BACKGROUND_CLASS), marked=marked
    )


def training_canvases(config: Mapping[str, Any]) -> DigitCanvases:
    """A config's training set: ``train_count`` digit canvases (seed 0) drawn as its ``data`` section says,
    plus ``background_count`` (default 0) digit-free ones as a ``background`` class (:func:`with_background_class`)."""
    data = digits(config["data"], config["train_count"], seed=0)
    return with_background_class(data, config["data"], config.get("background_count", 0), seed=0)


def train_config(spec: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a config's ``train`` section, with overrides (e.g. ``pooling``)."""
    return TrainConfig.from_dict({**spec, **overrides})


def train_on(
    config: TrainConfig, data: DigitCanvases, out: Path, *, progress: bool, eval_data: DigitCanvases | None = None
) -> TrainResult:
    """Train on in-memory canvases; a finished run in ``out`` with the same config is reused (resume)."""
    feed = ArrayFeed.from_images(data.images, data.labels, data.class_names, config)
    eval_feed = (
        ArrayFeed.from_images(eval_data.images, eval_data.labels, eval_data.class_names, config)
        if eval_data is not None
        else None
    )
    started = time.perf_counter()
    result = train(
        config, feed, out=out, eval_data=eval_feed, progress=progress, log=lambda m: print(m, file=sys.stderr)
    )
    print(f"  {out.name}: {result.steps} steps, {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return result


def model_inputs(config: TrainConfig, images: np.ndarray) -> np.ndarray:
    """[0, 1] canvases to model inputs with the config's normalization."""
    return ((images - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)).astype(np.float32)


def predict(model, variables, inputs: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Logits ``(N, K)`` in chunks (one compiled shape: the last chunk is padded)."""
    apply = jax.jit(model.apply)
    out = []
    for start in range(0, len(inputs), chunk):
        part = inputs[start : start + chunk]
        padded = np.pad(part, [(0, chunk - len(part))] + [(0, 0)] * (part.ndim - 1))
        out.append(np.asarray(apply(variables, padded))[: len(part)])
    return np.concatenate(out)


def explain_maps(
    model,
    variables,
    inputs: np.ndarray,
    targets: np.ndarray,
    method: str,
    *,
    layer: str | None = None,
    chunk: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """``(maps (N, H, W), logits (N, K))`` of ``method`` for the given target classes, in chunks of ``chunk``."""
    maps, logits = [], []
    for start in range(0, len(inputs), chunk):
        explanation = flaxcam.explain(
            model,
            variables,
            inputs[start : start + chunk],
            method=method,
            layer=layer,
            targets=np.asarray(targets[start : start + chunk]),
            key=jax.random.key(0),
        )
        maps.append(np.asarray(explanation.maps[:, 0]))
        logits.append(np.asarray(explanation.logits))
    return np.concatenate(maps), np.concatenate(logits)


def localization_scores(maps: np.ndarray, boxes_xyxy: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Means over the images: box IoU >= 0.5 (20% rule), the same only where the class is also right
    (top-1 localization), pointing game, energy-based pointing game, mean IoU."""
    boxes = jnp.asarray(boxes_xyxy, jnp.float32)
    hits = np.asarray(metrics.box_hits(maps, boxes))
    return {
        "box_iou>=0.5": float(hits.mean()),
        "top1_localization": float((hits * correct).mean()),
        "pointing_game": float(np.asarray(metrics.pointing_hits(maps, boxes)).mean()),
        "energy_pointing_game": float(np.asarray(metrics.energy_in_box(maps, boxes)).mean()),
        "mean_iou": float(np.asarray(metrics.box_iou_scores(maps, boxes)).mean()),
    }


def provenance(command: str) -> dict[str, Any]:
    """The command, git commit, versions and machine that produced a results file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": command,
        "git_commit": commit,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON (NumPy scalars converted)."""
    path.write_text(json.dumps(payload, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
