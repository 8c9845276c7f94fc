"""SESS and Deep Feature Factorization: flaxcam against pytorch-grad-cam on the same ResNet-18 weights.

    python -m benchmarks.sess_dff_peer [--batch 2] [--size 96x128] [--scales 12] [--repeats 2]

Both libraries get the same images, targets and 2 threads (torch.set_num_threads; XLA CPU on the
process). flaxcam is timed after one warm-up call (compilation excluded, reported separately); the
reference has no compilation. Prints seconds per call and images/s for each, and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _timed(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", default="96x128")
    parser.add_argument("--scales", type=int, default=12)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))

    import jax

    import flaxcam
    from flaxcam.bench.torch_ref import import_torchvision, randomize_batchnorm
    from flaxcam.dff import deep_feature_factorization
    from flaxcam.models import load_torchvision_resnet

    torch, torchvision = import_torchvision()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    with torch.no_grad():
        randomize_batchnorm(torch, reference, torch.Generator().manual_seed(100))
    reference.eval()
    model, variables = load_torchvision_resnet(reference.state_dict())
    images = torch.randn((args.batch, 3, height, width), generator=torch.Generator().manual_seed(1))
    nhwc = images.numpy().transpose(0, 2, 3, 1)
    targets = [int(c) for c in np.arange(args.batch) * 97 % 1000]

    from pytorch_grad_cam import SESS, DeepFeatureFactorization, GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    rows = []
    sess_options = {"num_scales": args.scales}
    with SESS(model=reference, target_layers=[reference.layer4], base_method=GradCAM, **sess_options) as cam:
        reference_sess = _timed(
            lambda: cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in targets]), 1
        )

    def ours_sess():
        jax.block_until_ready(
            flaxcam.explain(
                model, variables, nhwc, method="sess", layer="layer4", targets=targets, method_options=sess_options
            ).maps
        )

    start = time.perf_counter()
    ours_sess()
    compile_sess = time.perf_counter() - start
    rows.append(("sess", reference_sess, _timed(ours_sess, args.repeats), compile_sess))

    factorization = DeepFeatureFactorization(reference, reference.layer4, computation_on_concepts=reference.fc)
    with torch.no_grad():
        reference_dff = _timed(lambda: factorization(images, n_components=args.components), args.repeats)
    factorization.activations_and_grads.release()

    def ours_dff():
        result = deep_feature_factorization(
            model, variables, nhwc, layer="layer4", n_components=args.components, head="fc"
        )
        jax.block_until_ready(result.heatmaps)

    start = time.perf_counter()
    ours_dff()
    compile_dff = time.perf_counter() - start
    rows.append(("dff", reference_dff, _timed(ours_dff, args.repeats), compile_dff))

    print(
        f"ResNet-18, {args.batch} images {height}x{width}, layer4, {args.scales} SESS scales, {args.components} DFF components"
    )
    print(
        "| method | pytorch-grad-cam s/call | flaxcam s/call | images/s (ref → flaxcam) | ratio | flaxcam first call |"
    )
    print("|---|---|---|---|---|---|")
    for name, ref_s, ours_s, first in rows:
        print(
            f"| {name} | {ref_s:.2f} | {ours_s:.2f} | {args.batch / ref_s:.2f} → {args.batch / ours_s:.2f} | "
            f"{ref_s / ours_s:.1f}× | {first:.1f} s |"
        )


if __name__ == "__main__":
    main()
