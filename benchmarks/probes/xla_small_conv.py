"""XLA CPU convolution time against spatial size: a probe for the CPU backend gap.

    python -m benchmarks.probes.xla_small_conv

Times one 3x3 convolution (batch 16, NHWC/HWIO, SAME padding) at the channel counts and spatial sizes
of ResNet stages. On jax 0.10.2's CPU backend a 512->512 conv on 2x2 maps took longer than on 7x7 maps
with 12x the FLOPs (see benchmarks/README.md), which is why ResNets on small inputs are slow under XLA.
"""

from __future__ import annotations

import time

import jax
import numpy as np


def best_ms(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(batch: int = 16) -> None:
    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )
    rng = np.random.default_rng(0)
    print("| channels | spatial | GFLOP | ms | GFLOP/s |\n|---|---|---|---|---|")
    for channels, spatial in [(512, 2), (512, 4), (512, 7), (64, 16), (64, 56)]:
        w = jax.device_put(rng.standard_normal((3, 3, channels, channels)).astype(np.float32))
        x = jax.device_put(rng.standard_normal((batch, spatial, spatial, channels)).astype(np.float32))
        gflop = batch * spatial * spatial * channels * channels * 9 * 2 / 1e9
        ms = best_ms(conv, x, w)
        print(f"| {channels} | {spatial}x{spatial} | {gflop:.2f} | {ms:.1f} | {gflop / ms * 1e3:.1f} |")


if __name__ == "__main__":
    main()
