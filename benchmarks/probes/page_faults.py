"""Minor page faults and images/s per forward call, flaxcam (XLA) and torch, under this process's malloc settings.

    python -m benchmarks.probes.page_faults [--model resnet50] [--batch 16] [--calls 5]
    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 python -m benchmarks.probes.page_faults

Each library runs in its own subprocess (forward passes only, no gradients: torch's process is left
as a user's inference script would be, glibc has not yet raised its mmap threshold) on the same
seeded torchvision weights; prints the median images/s and minor page faults (``ru_minflt``) per call
after one warm-up call. Shows why the benchmark gives every worker the same tuned allocator
(``flaxcam.bench.runner.TUNED_ALLOCATOR_ENV``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _measure(call, batch: int, calls: int) -> dict:
    call()
    rates, faults = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        call()
        rates.append(batch / (time.perf_counter() - start))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"images_per_s": float(np.median(rates)), "minor_faults_per_call": int(np.median(faults))}


def _child(library: str, weights: str, model: str, batch: int, calls: int) -> None:
    images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if library == "flaxcam":
        import jax

        from flaxcam import models

        net, variables = models.load_torchvision_resnet(weights)
        forward = jax.jit(lambda v, x: net.apply(v, x))
        x = jax.device_put(images.transpose(0, 2, 3, 1))
        result = _measure(lambda: jax.block_until_ready(forward(variables, x)), batch, calls)
    else:
        import torch

        from flaxcam.bench.torch_ref import torchvision_resnet

        torch.set_num_threads(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
        net = torchvision_resnet(weights, model)
        x = torch.from_numpy(images)

        def call():
            with torch.no_grad():
                net(x)

        result = _measure(call, batch, calls)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probes.page_faults", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.model, args.batch, args.calls)
        return
    from flaxcam.bench import runner

    malloc = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")} or "glibc defaults"
    print(
        f"{args.model}, batch {args.batch}, 224x224, median of {args.calls} calls; malloc: {malloc}; load {os.getloadavg()[0]:.1f}"
    )
    print("| library | images/s | minor page faults per call |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        weights = runner.shared_weights(args.model, Path(folder))
        libraries = ["flaxcam"] + (["torch"] if weights is not None else [])
        for library in libraries:
            output = (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.probes.page_faults",
                        "--model",
                        args.model,
                        "--batch",
                        str(args.batch),
                        "--calls",
                        str(args.calls),
                        "--child",
                        library,
                        str(weights),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            result = json.loads(output)
            print(f"| {library} | {result['images_per_s']:.1f} | {result['minor_faults_per_call']:,} |", flush=True)


if __name__ == "__main__":
    main()
