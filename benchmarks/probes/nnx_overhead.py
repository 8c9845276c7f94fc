"""Host overhead of explaining an NNX model: the pieces of ``flaxcam.plan.split_nnx`` and an interleaved
A/B of ``explain`` on the NNX twin against linen on the same weights.

    python -m benchmarks.probes.nnx_overhead [--model efficientnet_lite0] [--size 224] [--calls 200]

Times (median per call, after one warm-up): flax's ``nnx.split`` (what ``explain`` did on every call
before the kept split), ``jax.tree.flatten`` of the model (the structure check), reading the kept
split's variables (``get_raw_value``), flattening an ``nnx.State`` against the plain list of its leaves,
and ``explain`` at batch 1 for CAM and Grad-CAM, linen and NNX alternating call by call (the first of
each pair alternates too) so that the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _median_ms(call: Callable[[], object], calls: int) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0", choices=("efficientnet_lite0", "resnet18"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    from flax import nnx

    import flaxcam
    from flaxcam.bench import models as bench_models

    linen = bench_models.load({"model": args.model, "dtype": "float32"})
    twin = bench_models.load({"model": args.model, "dtype": "float32", "api": "nnx"}).model
    _, state = nnx.split(twin)
    leaves = jax.tree_util.tree_leaves(state)
    variables = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    pieces = {
        "nnx.split(model)": lambda: nnx.split(twin),
        "jax.tree.flatten(model)": lambda: jax.tree_util.tree_flatten(twin),
        "read the kept variables (get_raw_value)": lambda: [v.get_raw_value() for v in variables],
        "jax.tree.flatten(nnx.State)": lambda: jax.tree_util.tree_flatten(state),
        "jax.tree.flatten(list of leaves)": lambda: jax.tree_util.tree_flatten(leaves),
    }
    print(f"{args.model}: {len(leaves)} arrays")
    print("| host step | ms per call |")
    print("|---|---|")
    for name, piece in pieces.items():
        print(f"| {name} | {_median_ms(piece, args.calls):.3f} |")

    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, args.size, args.size, 3)), jnp.float32)
    print()
    print("| method | linen ms | NNX ms | NNX / linen (speed) |")
    print("|---|---|---|---|")
    for method in ("cam", "gradcam"):

        def run_linen(method: str = method) -> None:
            jax.block_until_ready(flaxcam.explain(linen.model, linen.variables, images, method=method).maps)

        def run_nnx(method: str = method) -> None:
            jax.block_until_ready(flaxcam.explain(twin, images, method=method).maps)

        times: dict[str, list[float]] = {"linen": [], "nnx": []}
        for call in (run_linen, run_nnx, run_linen, run_nnx):  # compile and warm both
            call()
        for index in range(args.calls):
            pair = [("linen", run_linen), ("nnx", run_nnx)]
            for name, call in pair if index % 2 else pair[::-1]:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        linen_ms, nnx_ms = (1000 * statistics.median(times[k]) for k in ("linen", "nnx"))
        print(f"| {method} | {linen_ms:.2f} | {nnx_ms:.2f} | {linen_ms / nnx_ms:.3f} |")


if __name__ == "__main__":
    main()
