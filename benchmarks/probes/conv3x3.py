"""XLA CPU: ResNet's 3x3 convolutions in four formulations, against torch's (oneDNN) on the same shapes.

    python -m benchmarks.probes.conv3x3 [--batch 16] [--rounds 7]

Each 3x3 stride-1 convolution shape of ResNet-50 (batch 16, 224x224 input) is timed as
``lax.conv_general_dilated`` with HWIO and with OIHW kernels, as an im2col matrix product (the nine
shifted copies concatenated along channels, one ``dot`` with K = 9C), and as three ``dot``s over the
row offsets of a width-only im2col (K = 3C); and, when torch is installed, as torch's ``Conv2d`` (NCHW,
no grad) with the same thread count, in a separate process (in one process, the second library's thread
pool slows the first one down). Median ms of interleaved rounds. The library keeps XLA's
convolution for 3x3 kernels: none of the reformulations beat it (see benchmarks/README.md). Run with
the benchmark's allocator settings (``flaxcam.bench.runner.TUNED_ALLOCATOR_ENV``) to time the arithmetic,
not page faults.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (spatial size, channels) of ResNet-50's 3x3 stride-1 convolutions at 224x224
SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]


def conv_hwio(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_oihw(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(
        x, jnp.transpose(w, (3, 2, 0, 1)), (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "OIHW", "NHWC")
    )


def im2col(x: jax.Array, w: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    columns = jnp.concatenate([padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=-1)
    return jnp.einsum("nhwk,kd->nhwd", columns, w.reshape(-1, w.shape[-1]))


def row_dots(x: jax.Array, w: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.concatenate([padded[:, :, j : j + width] for j in range(3)], axis=-1)  # (N, H + 2, W, 3C)
    first, second, third = (
        jnp.einsum("nhwk,kd->nhwd", rows[:, i : i + height], w[i].reshape(-1, w.shape[-1])) for i in range(3)
    )
    return first + second + third


FORMS = {"XLA conv (HWIO)": conv_hwio, "XLA conv (OIHW)": conv_oihw, "im2col dot": im2col, "3 row dots": row_dots}


def _ms(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def _print_torch_times(batch: int, rounds: int) -> None:
    """``size channels median_ms`` per shape for torch's ``Conv2d`` (the ``--torch-only`` subprocess)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    rng = np.random.default_rng(0)
    for size, channels in SHAPES:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        x = torch.from_numpy(rng.standard_normal((batch, channels, size, size), dtype=np.float32))
        times = []
        with torch.no_grad():
            conv(x)
            for _ in range(rounds):
                start = time.perf_counter()
                conv(x)
                times.append((time.perf_counter() - start) * 1e3)
        print(size, channels, f"{np.median(times):.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probes.conv3x3", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)  # the torch subprocess
    args = parser.parse_args(argv)
    if args.torch_only:
        _print_torch_times(args.batch, args.rounds)
        return
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with_torch = importlib.util.find_spec("torch") is not None
    rng = np.random.default_rng(0)
    print(
        f"batch {args.batch}, {args.rounds} interleaved rounds (median ms), {threads} thread(s), "
        f"load {os.getloadavg()[0]:.1f}, MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}"
    )
    names = list(FORMS) + (["torch Conv2d (NCHW)"] if with_torch else [])
    print("| size | channels | " + " | ".join(names) + " | max rel. difference of the dot forms |")
    print("|---|---|" + "---|" * len(names) + "---|")
    jitted = {name: jax.jit(fn) for name, fn in FORMS.items()}
    torch_ms = {}
    if with_torch:  # first, in its own process
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.probes.conv3x3",
                "--torch-only",
                "--batch",
                str(args.batch),
                "--rounds",
                str(args.rounds),
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        for line in output.splitlines():
            size_text, channels_text, ms = line.split()
            torch_ms[(int(size_text), int(channels_text))] = float(ms)
    for size, channels in SHAPES:
        x = rng.standard_normal((args.batch, size, size, channels), dtype=np.float32)
        w = rng.standard_normal((3, 3, channels, channels), dtype=np.float32) / np.sqrt(9 * channels)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        reference = np.asarray(jitted["XLA conv (HWIO)"](xj, wj))
        difference = max(
            float(np.abs(np.asarray(jitted[name](xj, wj)) - reference).max() / np.abs(reference).max())
            for name in ("im2col dot", "3 row dots")
        )
        times: dict[str, list[float]] = {name: [] for name in jitted}
        for fn in jitted.values():
            fn(xj, wj)  # compile
        for _ in range(args.rounds):
            for name, fn in jitted.items():
                times[name].append(_ms(fn, xj, wj))
        if with_torch:
            times["torch Conv2d (NCHW)"] = [torch_ms[(size, channels)]]
        cells = " | ".join(f"{np.median(times[name]):.1f}" for name in names)
        print(f"| {size}x{size} | {channels} | {cells} | {difference:.0e} |", flush=True)


if __name__ == "__main__":
    main()
