"""XLA CPU: depthwise convolution as a grouped convolution vs as k*k shifted multiply-adds.

    python -m benchmarks.probes.depthwise_conv

EfficientNet-Lite0's depthwise layer shapes at 224x224, batch 16; prints ms per call of each form and
their relative difference (the library uses the shifted form, ``depthwise_conv_same``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcam.models.efficientnet import depthwise_conv_same

# (spatial size, channels, kernel, stride) of EfficientNet-Lite0's depthwise convolutions at 224x224.
SHAPES = [
    (112, 32, 3, 1),
    (112, 96, 3, 2),
    (56, 144, 3, 1),
    (28, 240, 5, 1),
    (14, 480, 3, 1),
    (14, 672, 5, 1),
    (7, 1152, 5, 1),
]


def _grouped(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )


def _time(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args).block_until_ready()
    return (time.perf_counter() - start) / repeats


def main(batch: int = 16) -> None:
    rng = np.random.default_rng(0)
    print(
        "| size | channels | kernel | stride | grouped conv (ms) | shifted sum (ms) | speedup | max rel. difference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, channels, kernel_size, stride in SHAPES:
        x = jnp.asarray(rng.random((batch, size, size, channels), dtype=np.float32))
        kernel = jnp.asarray(rng.random((kernel_size, kernel_size, 1, channels), dtype=np.float32))
        grouped = jax.jit(_grouped, static_argnums=2)
        shifted = jax.jit(depthwise_conv_same, static_argnums=2)
        difference = float(jnp.max(jnp.abs(grouped(x, kernel, stride) - shifted(x, kernel, stride))))
        difference /= float(jnp.max(jnp.abs(grouped(x, kernel, stride))))
        t_grouped, t_shifted = _time(grouped, x, kernel, stride), _time(shifted, x, kernel, stride)
        print(
            f"| {size} | {channels} | {kernel_size} | {stride} | {t_grouped * 1e3:.1f} | {t_shifted * 1e3:.1f} "
            f"| {t_grouped / t_shifted:.1f}× | {difference:.1e} |"
        )


if __name__ == "__main__":
    main()
