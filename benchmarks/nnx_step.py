"""NNX vs linen on the same weights, and the jitted explainer step vs the jitted forward pass.

``python -m benchmarks.nnx_step [--size 224] [--repeats 10]``: EfficientNet-Lite0 (random weights,
linen and its NNX twin holding the same variables); times forward, CAM and Grad-CAM through
``flaxcam.explain`` for both, and ``jax.jit(flaxcam.explainer(...))`` at batch 1 against
``jax.jit(model.apply)``. Prints a Markdown table of medians and ratios (one run, CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

import flaxcam
from flaxcam import models
from flaxcam.models.nnx_efficientnet import efficientnet_lite0_nnx


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
    linen = models.efficientnet_lite0()
    variables = linen.init(jax.random.key(1), images[:1])
    twin = efficientnet_lite0_nnx(variables)
    state = nnx.state(twin)
    graphdef = nnx.graphdef(twin)
    linen_forward = jax.jit(linen.apply)
    nnx_forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    rows = [("forward", _median_ms(lambda: linen_forward(variables, images), args.repeats),
             _median_ms(lambda: nnx_forward(state, images), args.repeats))]
    for method in ("cam", "gradcam"):
        rows.append((
            method,
            _median_ms(lambda: flaxcam.explain(linen, variables, images, method=method).maps, args.repeats),
            _median_ms(lambda: flaxcam.explain(twin, images, method=method).maps, args.repeats),
        ))
    print(f"EfficientNet-Lite0, batch {args.batch}, {args.size}x{args.size}, median of {args.repeats} (ms)\n")
    print("| | linen | NNX | NNX speed / linen |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    one = images[:1]
    step = jax.jit(flaxcam.explainer(linen, method="gradcam"))
    forward_1 = _median_ms(lambda: linen_forward(variables, one), args.repeats)
    step_1 = _median_ms(lambda: step(variables, one).maps, args.repeats)
    explain_1 = _median_ms(lambda: flaxcam.explain(linen, variables, one, method="gradcam").maps, args.repeats)
    print(f"\nbatch 1: jitted forward {forward_1:.1f} ms, jitted Grad-CAM step {step_1:.1f} ms "
          f"({step_1 / forward_1:.2f}x), explain() {explain_1:.1f} ms ({explain_1 / forward_1:.2f}x)")


if __name__ == "__main__":
    main()
