"""Throughput of flaxcam's methods relative to the model's own forward pass, measured in one run.

    python -m benchmarks.throughput [--models resnet18 resnet50] [--batch 16] [--size 224 224]
                                    [--methods cam gradcam | all] [--rounds 10] [--out FILE.jsonl]
                                    [--method-options '{"num_samples": 2}']

For each model: a jitted forward pass (logits only) and ``flaxcam.explain`` for each method (maps at
the input resolution, targets = argmax), timed interleaved round by round so that machine noise hits
all of them alike; each timing ends with ``block_until_ready``. Prints one JSON line per measurement
(images/s from the median round, ratio to the forward pass of the same run) and a Markdown table.
Score-based methods need P forward passes per image (``METHODS[name].forward_passes(C, options)``:
C for ScoreCAM and AblationCAM, N·C for SS-CAM / IS-CAM with N samples, min(N, C) for Faster-ScoreCAM,
C channels at the layer), run in chunks of ``--chunk-size`` images: their *floor* is the forward rate
at batch ``chunk_size`` divided by P, and ``ratio_to_floor`` says how close they come to it.
``--method-options`` (JSON) sets method options, each given only to the methods that have it.
Exact Grad-CAM++ (``gradcam++exact``) takes one third-order forward-mode pass of the network after the
layer per element of the layer, ``h·w·C`` passes per batch (``derivative_passes`` in its record): with
``--methods all`` it dominates the run (seconds per batch even at ResNet-18's ``layer4``, whose tail is
only pooling and the Dense head; minutes on CPU at 224×224). Methods that read higher derivatives
(``gradcam++exact``, ``shapleycam``) are timed on the softmax score, whose derivatives do not vanish.
Random weights: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import flaxcam
from flaxcam import models


def _time_once(fn: Callable[[], jax.Array]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def machine_info() -> dict:
    """Where the numbers come from."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device": device.device_kind,
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "flaxcam": flaxcam.__version__,
        "python": platform.python_version(),
    }


def options_for(method: str, options: dict) -> dict:
    """The subset of ``options`` that ``method`` accepts."""
    return {key: value for key, value in options.items() if key in flaxcam.METHODS[method].options}


def score_for(method: str) -> str:
    """The target score a method is timed with: the softmax probability for the methods that read
    higher derivatives (those of a ReLU network's logit vanish, and XLA would skip the work), else the
    logit."""
    higher = {"hvp", "second_derivatives"} & set(flaxcam.METHODS[method].inputs)
    return "softmax" if higher else "logit"


def benchmark_model(
    name: str,
    methods: list[str],
    batch: int,
    size: tuple[int, int],
    rounds: int,
    warmup: int = 2,
    chunk_size: int = 32,
    method_options: dict | None = None,
) -> list[dict]:
    """Time forward-only and each method on one model; returns one record per measurement."""
    method_options = method_options or {}
    model = models.create_model(name)
    variables = models.init_variables(model, (1, *size, 3))
    images = jax.device_put(np.random.default_rng(0).standard_normal((batch, *size, 3)).astype(np.float32))

    forward = jax.jit(lambda v, x: model.apply(v, x))
    candidates: dict[str, Callable[[], jax.Array]] = {"forward": lambda: forward(variables, images)}
    if any(flaxcam.METHODS[m].passes is not None for m in methods):  # the score methods' floor: chunk-sized batches
        chunk_images = jax.device_put(np.random.default_rng(1).standard_normal((chunk_size, *size, 3)).astype(np.float32))
        candidates["forward_chunk"] = lambda: forward(variables, chunk_images)
    for method in methods:
        candidates[method] = lambda method=method: flaxcam.explain(
            model, variables, images, method=method, chunk_size=chunk_size,
            method_options=options_for(method, method_options), score=score_for(method),
        ).maps

    for fn in candidates.values():
        for _ in range(warmup):
            _time_once(fn)
    timings: dict[str, list[float]] = {key: [] for key in candidates}
    for _ in range(rounds):
        for key, fn in candidates.items():
            timings[key].append(_time_once(fn))

    forward_rate = batch / statistics.median(timings["forward"])
    layer_shape = [info for info in flaxcam.list_layers(model, variables, images) if info.is_spatial][-1].shape
    channels = layer_shape[-1]
    records = []
    for key, values in timings.items():
        rate = (chunk_size if key == "forward_chunk" else batch) / statistics.median(values)
        extra = {}
        passes = flaxcam.METHODS[key].forward_passes(channels, options_for(key, method_options)) if key in flaxcam.METHODS else None
        if key in flaxcam.METHODS and options_for(key, method_options):
            extra["options"] = options_for(key, method_options)
        if passes is not None:
            chunk_rate = chunk_size / statistics.median(timings["forward_chunk"])
            extra.update({
                "chunk_size": chunk_size,
                "forward_passes_per_image": passes,
                "floor_images_per_s": round(chunk_rate / passes, 4),
                "ratio_to_floor": round(rate * passes / chunk_rate, 3),
            })
        if key in flaxcam.METHODS and "second_derivatives" in flaxcam.METHODS[key].inputs:
            extra.update({"chunk_size": chunk_size, "derivative_passes": int(np.prod(layer_shape[1:]))})
        records.append(
            {
                "model": name,
                "method": key,
                "batch": chunk_size if key == "forward_chunk" else batch,
                "size": list(size),
                "images_per_s": round(rate, 2),
                "ratio_to_forward": round(rate / forward_rate, 3),
                "median_s": round(statistics.median(values), 5),
                "min_s": round(min(values), 5),
                "rounds": rounds,
                **({"score": score_for(key)} if key in flaxcam.METHODS else {}),
                **extra,
            }
        )
    return records


def markdown_table(records: list[dict]) -> str:
    """The records as a Markdown table."""
    lines = [
        "| model | method | batch | size | images/s | ratio to forward | ratio to floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        floor = f"{r['ratio_to_floor']:.3f}" if "ratio_to_floor" in r else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} | {r['size'][0]}x{r['size'][1]} | "
            f"{r['images_per_s']:.2f} | {r['ratio_to_forward']:.3f} | {floor} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=["cam", "gradcam"], help="method names, or 'all'")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=32, help="masked/ablated images per forward pass")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    parser.add_argument(
        "--method-options", type=json.loads, default={}, help='JSON options, e.g. \'{"num_samples": 2}\' (to the methods that have them)'
    )
    args = parser.parse_args(argv)

    if args.methods == ["all"]:
        args.methods = list(flaxcam.METHODS)
    info = machine_info()
    records = []
    for name in args.models:
        for record in benchmark_model(
            name, args.methods, args.batch, tuple(args.size), args.rounds, chunk_size=args.chunk_size,
            method_options=args.method_options,
        ):
            record.update(info)
            records.append(record)
            print(json.dumps(record), flush=True)
    print()
    print(markdown_table(records))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
