"""XLA CPU: 1x1 convolution as ``lax.conv_general_dilated`` vs as a matrix product (``pointwise_conv``).

    python -m benchmarks.probes.pointwise_conv [--batch 16] [--rounds 7]

ResNet-50's and EfficientNet-Lite0's 1x1 layer shapes at 224x224; prints the median ms per call of
each form (interleaved rounds), their ratio and relative difference. flaxcam's models use the matrix
product (:func:`flaxcam.models.layers.pointwise_conv`). Run it with the benchmark's allocator settings
(``flaxcam.bench.runner.TUNED_ALLOCATOR_ENV``) to time the arithmetic rather than page faults, e.g.
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 python -m benchmarks.probes.pointwise_conv``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcam.models.layers import pointwise_conv

# (model, spatial size, in channels, out channels, stride)
SHAPES = [
    ("resnet50 layer1", 56, 64, 64, 1),
    ("resnet50 layer1", 56, 64, 256, 1),
    ("resnet50 layer1", 56, 256, 64, 1),
    ("resnet50 layer2 downsample", 56, 256, 512, 2),
    ("resnet50 layer2", 28, 512, 128, 1),
    ("resnet50 layer2", 28, 128, 512, 1),
    ("resnet50 layer3", 14, 1024, 256, 1),
    ("resnet50 layer3", 14, 256, 1024, 1),
    ("resnet50 layer4", 7, 2048, 512, 1),
    ("resnet50 layer4", 7, 512, 2048, 1),
    ("efficientnet_lite0 expand", 56, 24, 144, 1),
    ("efficientnet_lite0 project", 56, 144, 24, 1),
    ("efficientnet_lite0 expand", 14, 80, 480, 1),
    ("efficientnet_lite0 head", 7, 320, 1280, 1),
]


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args).block_until_ready()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.pointwise_conv", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    conv = jax.jit(_conv, static_argnums=2)
    matmul = jax.jit(pointwise_conv, static_argnums=2)
    print(
        f"batch {args.batch}, {args.rounds} interleaved rounds (median), {os.cpu_count()} CPU(s), "
        f"load {os.getloadavg()[0]:.1f}, MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}"
    )
    print("| layer | size | in → out | stride | conv (ms) | matmul (ms) | conv / matmul | max rel. difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, cin, cout, stride in SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, cin), dtype=np.float32))
        kernel = jnp.asarray(rng.standard_normal((1, 1, cin, cout), dtype=np.float32) / np.sqrt(cin))
        expected, got = conv(x, kernel, stride), matmul(x, kernel, stride)
        difference = float(jnp.max(jnp.abs(expected - got)) / jnp.max(jnp.abs(expected)))
        t_conv, t_matmul = [], []
        for _ in range(args.rounds):
            t_conv.append(_seconds(conv, x, kernel, stride))
            t_matmul.append(_seconds(matmul, x, kernel, stride))
        c, m = float(np.median(t_conv)), float(np.median(t_matmul))
        print(
            f"| {name} | {size}x{size} | {cin} → {cout} | {stride} | {c * 1e3:.1f} | {m * 1e3:.1f} | {c / m:.2f}× | {difference:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
