"""Throughput of flaxcam's methods relative to the model's own forward pass, measured in one run.

    python -m benchmarks.throughput [--models resnet18 resnet50] [--batch 16] [--size 224 224]
                                    [--methods cam gradcam | all] [--rounds 10] [--out DIR]
                                    [--method-options '{"num_samples": 2}']

A thin entry point over :func:`flaxcam.bench.run` (``flaxcam bench``), one run per model: the jitted
forward pass and ``flaxcam.explain`` for each method, timed interleaved round by round, each timing
ending with ``block_until_ready``; images/s from the median round and the ratio to the forward pass of
the same run. Score-based methods need P forward passes per image (``forward_passes_per_image``:
``METHODS[name].forward_passes(C, options)``, C channels at the layer), run in chunks of
``--chunk-size`` images: their *floor* is the forward rate at batch ``chunk_size`` divided by P, and
``ratio_to_floor`` says how close they come to it. Methods that read higher derivatives
(``gradcam++exact``, ``shapleycam``) are timed on the softmax score, whose derivatives do not vanish.
Random weights: speed does not depend on their values. The records of ``results/throughput_cpu.jsonl``
and ``results/throughput_score_cpu.jsonl`` were written by this script's single-process version before
commit e08014f had moved the machinery into ``flaxcam.bench`` (same quantities, older field names).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """Where the numbers come from (JAX's platform and devices; used by the audit benchmarks)."""
    import jax

    import flaxcam

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


def main(argv: list[str] | None = None) -> list[dict]:
    from flaxcam.bench import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=["cam", "gradcam"], help="method names, or 'all'")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=32, help="masked/ablated images per forward pass")
    parser.add_argument("--out", type=Path, default=None, help="folder for throughput_<model>.{jsonl,md,png}")
    parser.add_argument(
        "--method-options",
        type=json.loads,
        default={},
        help="JSON options, e.g. '{\"num_samples\": 2}' (to the methods that have them)",
    )
    args = parser.parse_args(argv)
    records = []
    for name in args.models:
        records += run(
            model=name,
            methods=args.methods,
            batches=[args.batch],
            size=args.size,
            rounds=args.rounds,
            warmup=args.warmup,
            chunk_size=args.chunk_size,
            method_options=args.method_options,
            out=args.out,
            name=f"throughput_{name}",
            command="python -m benchmarks.throughput " + " ".join(argv or []),
        )
    return records


if __name__ == "__main__":
    main()
