"""Throughput of the faithfulness metrics: flaxcam.evaluation against pytorch-grad-cam 1.5.7 and torchcam
0.5 on the same weights (torchvision's ResNet-18 or ResNet-50 with random weights, or the pretrained
EfficientNet-Lite0 and its efficientnet-lite-pytorch reference), images and maps, and each metric's cost
in forward passes of the same library's model.

    python -m benchmarks.evaluation_metrics [--model resnet18|resnet50|efficientnet_lite0] [--batch 2]
        [--size 224] [--repeats 3] [--out benchmarks/results/evaluation_metrics[_MODEL]_cpu.md]

Metrics timed (one call each for the whole batch; median of ``--repeats`` after one warm-up call, so
flaxcam's compilation is excluded; torch uses 2 threads):
* confidence change under the map (pgc ``CamMultImageConfidenceChange``; flaxcam ``confidence_change``);
* ROAD MoRF + LeRF at percentiles 20, 50, 80 (pgc ``ROADMostRelevantFirstAverage`` +
  ``ROADLeastRelevantFirstAverage``: a SciPy sparse solve per image and percentile on the host; flaxcam
  ``road``: batched conjugate gradient on device, one program);
* deletion + insertion, 20 steps, zero baseline (torchcam ``DeletionInsertionMetric``, batch_size 32;
  flaxcam ``deletion_insertion``, chunk_size 32).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for flaxcam)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("resnet18", "resnet50", "efficientnet_lite0"), default="resnet18")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/evaluation_metrics[_MODEL]_cpu.md")
    args = parser.parse_args(argv)
    suffix = "" if args.model == "resnet18" else f"_{args.model}"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"evaluation_metrics{suffix}_cpu.md"
    import torch

    from flaxcam.bench.torch_ref import define_torchvision_schemas

    define_torchvision_schemas()
    import torchvision
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from scipy.ndimage import gaussian_filter
    from torchcam.metrics import DeletionInsertionMetric

    from flaxcam import evaluation
    from flaxcam.models import load_torchvision_resnet

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.model == "efficientnet_lite0":
        from flaxcam.bench.torch_ref import efficientnet_lite0_reference
        from flaxcam.models import pretrained_efficientnet_lite0

        reference = efficientnet_lite0_reference()
        model, variables, _ = pretrained_efficientnet_lite0()
    else:
        reference = getattr(torchvision.models, args.model)().eval()
        model, variables = load_torchvision_resnet(reference.state_dict())
    apply_fn = cast(Callable[[Any, jax.Array], jax.Array], model.apply)  # the metrics' ApplyFn: logits
    rng = np.random.default_rng(0)
    batch, size = args.batch, args.size
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    maps = np.stack([gaussian_filter(rng.random((size, size)), 8) for _ in range(batch)]).astype(np.float32)
    maps = (maps - maps.min(axis=(1, 2), keepdims=True)) / np.ptp(maps, axis=(1, 2), keepdims=True)
    classes = list(range(batch))
    torch_images = torch.from_numpy(images)
    flax_images = jnp.asarray(images.transpose(0, 2, 3, 1))
    flax_maps, targets = jnp.asarray(maps), np.asarray(classes)
    pgc_targets = [ClassifierOutputTarget(c) for c in classes]
    percentiles = [20, 50, 80]

    class GivenMaps:
        def __init__(self):
            self.model = reference

        def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
            return [torch.from_numpy(maps)]

        def fuse_cams(self, cams):
            return cams[0]

        def _hooks_off(self):
            return contextlib.nullcontext()

    def torch_forward():
        with torch.no_grad():
            reference(torch_images)

    forward = jax.jit(model.apply)
    runs = {
        "forward pass": (lambda: forward(variables, flax_images).block_until_ready(), torch_forward, 1),
        "confidence change": (
            lambda: evaluation.confidence_change(
                apply_fn, variables, flax_images, flax_maps, targets
            ).block_until_ready(),
            lambda: CamMultImageConfidenceChange()(torch_images, maps, pgc_targets, reference),
            2,
        ),
        "ROAD MoRF + LeRF, 3 percentiles": (
            lambda: jax.block_until_ready(
                evaluation.road(
                    apply_fn, variables, flax_images, flax_maps, targets, percentiles=percentiles, chunk_size=16
                )
            ),
            lambda: (
                ROADMostRelevantFirstAverage(percentiles)(torch_images, maps, pgc_targets, reference),
                ROADLeastRelevantFirstAverage(percentiles)(torch_images, maps, pgc_targets, reference),
            ),
            2 * (1 + 2 * len(percentiles)),
        ),
        "deletion + insertion, 20 steps": (
            lambda: jax.block_until_ready(
                evaluation.deletion_insertion(
                    apply_fn, variables, flax_images, flax_maps, targets, steps=20, chunk_size=32
                )
            ),
            lambda: _torchcam_deletion(DeletionInsertionMetric, GivenMaps(), torch_images, classes),
            1 + 1 + 2 * 19,
        ),
    }
    rows = []
    for name, (ours, theirs, passes) in runs.items():
        ours_s = _median_seconds(ours, args.repeats)
        theirs_s = _median_seconds(theirs, args.repeats)
        rows.append((name, passes, batch / ours_s, batch / theirs_s))
        print(
            f"{name}: flaxcam {batch / ours_s:.2f} images/s, reference {batch / theirs_s:.2f} images/s", file=sys.stderr
        )
    forward_ours, forward_theirs = rows[0][2], rows[0][3]
    lines = [
        f"# Faithfulness metrics: flaxcam vs pytorch-grad-cam / torchcam ({args.model}, batch {batch}, {size}×{size})",
        "",
        f"`python -m benchmarks.evaluation_metrics --model {args.model} --batch {batch} --size {size} "
        f"--repeats {args.repeats}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end (a shared, loaded machine: ratios are indicative); jax {jax.__version__}, "
        f"torch {torch.__version__} (2 threads). Median of {args.repeats} calls after a warm-up.",
        "",
        "| metric | forward passes per image (flaxcam's schedule) | flaxcam images/s | reference images/s | flaxcam / reference "
        "| flaxcam cost in its forward passes | reference cost in its forward passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, passes, ours, theirs in rows:
        lines.append(
            f"| {name} | {passes} | {ours:.2f} | {theirs:.2f} | **{ours / theirs:.2f}×** "
            f"| {forward_ours / ours:.1f} | {forward_theirs / theirs:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _torchcam_deletion(metric_class, extractor, images, classes):
    metric = metric_class(extractor, None, steps=20, batch_size=32)
    metric.update(images, classes)
    return metric.summary()


if __name__ == "__main__":
    main()
