"""Convolution layouts on this CPU: XLA with NHWC vs NCHW operands, torch with NCHW vs channels-last.

    python -m benchmarks.conv_layout [--batch 16] [--rounds 5] [--threads N]

ResNet-50's convolution shapes (one per stage, 3x3 and 1x1), timed alone. XLA and torch run in
separate processes (this script starts itself once per library) with the same CPU affinity; within a
process the layouts are interleaved round by round. Prints a Markdown table (GFLOP/s from the median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: (spatial, input channels, output channels, kernel) of ResNet-50's convolutions at 224x224.
SHAPES = ((56, 64, 64, 3), (56, 256, 64, 1), (28, 128, 128, 3), (14, 256, 256, 3), (7, 512, 512, 3), (7, 2048, 512, 1))


def _flop(batch: int, spatial: int, cin: int, cout: int, kernel: int) -> float:
    return 2.0 * batch * spatial * spatial * cin * cout * kernel * kernel


def _time(fn, rounds: int) -> float:
    fn()
    values = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def _jitted_conv(inputs, kernel, dimension_numbers):
    """A zero-argument call of the jitted convolution that returns when the result is ready."""
    import jax

    conv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dimension_numbers))
    return lambda: conv(inputs, kernel).block_until_ready()


def measure_jax(batch: int, rounds: int) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for spatial, cin, cout, kernel in SHAPES:
        x = rng.standard_normal((batch, spatial, spatial, cin), dtype=np.float32)
        w = rng.standard_normal((kernel, kernel, cin, cout), dtype=np.float32)
        layouts = {
            "NHWC": (jnp.asarray(x), jnp.asarray(w), ("NHWC", "HWIO", "NHWC")),
            "NCHW": (jnp.asarray(x.transpose(0, 3, 1, 2)), jnp.asarray(w.transpose(3, 2, 0, 1)), ("NCHW", "OIHW", "NCHW")),
        }
        fns = {name: _jitted_conv(a, b, dn) for name, (a, b, dn) in layouts.items()}
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            rows.append({"library": "xla", "layout": name, "shape": [spatial, cin, cout, kernel],
                         "seconds": statistics.median(values)})
    return rows


def measure_torch(batch: int, rounds: int, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for spatial, cin, cout, kernel in SHAPES:
        conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False).eval()
        x = torch.randn(batch, cin, spatial, spatial, generator=generator)
        last = conv.to(memory_format=torch.channels_last)
        variants = {"NCHW": (torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False).eval(), x),
                    "channels_last": (last, x.to(memory_format=torch.channels_last))}
        times = {name: [] for name in variants}
        with torch.no_grad():
            for module, inputs in variants.values():
                module(inputs)
            for _ in range(rounds):
                for name, (module, inputs) in variants.items():
                    start = time.perf_counter()
                    module(inputs)
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            rows.append({"library": "torch", "layout": name, "shape": [spatial, cin, cout, kernel],
                         "seconds": statistics.median(values)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--library", choices=["xla", "torch"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.library == "xla":
        print(json.dumps(measure_jax(args.batch, args.rounds)))
        return
    if args.library == "torch":
        print(json.dumps(measure_torch(args.batch, args.rounds, args.threads)))
        return
    rows = []
    cpus = set(sorted(os.sched_getaffinity(0))[: args.threads])
    for library in ("xla", "torch"):
        command = [sys.executable, "-m", "benchmarks.conv_layout", "--library", library, "--batch", str(args.batch),
                   "--rounds", str(args.rounds), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    print(f"batch {args.batch}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print("| conv (spatial, in → out, kernel) | XLA NHWC GFLOP/s | XLA NCHW GFLOP/s | torch NCHW GFLOP/s | torch channels-last GFLOP/s |")
    print("|---|---|---|---|---|")
    for spatial, cin, cout, kernel in SHAPES:
        flop = _flop(args.batch, spatial, cin, cout, kernel)
        rate = {(r["library"], r["layout"]): flop / r["seconds"] / 1e9 for r in rows if r["shape"] == [spatial, cin, cout, kernel]}
        print(f"| {spatial}x{spatial}, {cin} → {cout}, {kernel}x{kernel} | {rate[('xla', 'NHWC')]:.0f} | "
              f"{rate[('xla', 'NCHW')]:.0f} | {rate[('torch', 'NCHW')]:.0f} | {rate[('torch', 'channels_last')]:.0f} |")


if __name__ == "__main__":
    main()
