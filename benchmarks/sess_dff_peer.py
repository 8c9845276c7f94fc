"""SESS and Deep Feature Factorization: flaxcam against pytorch-grad-cam on the same ResNet-18 weights.

    python -m benchmarks.sess_dff_peer [--batch 2] [--size 96x128] [--scales 12] [--repeats 2]

Both libraries get the same images, targets and 2 threads (torch.set_num_threads; XLA CPU on the
process). flaxcam is timed after one warm-up call (compilation excluded, reported separately); the
reference has no compilation. Prints seconds per call and images/s for each, and the ratio.

SESS's bound: the same run splits pytorch-grad-cam's SESS call into its torch work (the patch scores'
forward passes and the base Grad-CAM's forward + backward passes, timed around ``get_scores`` and
``base_cam.forward``) and the rest (patch cutting, pasting, fusion, blur), and times flaxcam's floor:
its jitted Grad-CAM step over all the patches, 32 per call like pytorch-grad-cam's ``batch_size``
(the last call padded to 32; no cutting, pasting or fusion). The ratio flaxcam could reach
if its SESS cost no more than that floor is pytorch-grad-cam's time over the floor.
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
    torch_seconds = {"get_scores": 0.0, "base_cam": 0.0}

    def timed_part(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch_seconds[name] += time.perf_counter() - start

        return wrapper

    with SESS(model=reference, target_layers=[reference.layer4], base_method=GradCAM, **sess_options) as cam:
        cam.get_scores = timed_part("get_scores", cam.get_scores)
        cam.base_cam.forward = timed_part("base_cam", cam.base_cam.forward)
        reference_sess = _timed(
            lambda: cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in targets]), 1
        )
    floor_seconds, patch_count = _flaxcam_floor(model, variables, nhwc, targets, sess_options, args.repeats)

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
    torch_work = torch_seconds["get_scores"] + torch_seconds["base_cam"]
    print()
    print(f"SESS in detail ({patch_count} patches of {min(height, width)}x{min(height, width)} per image):")
    print(
        f"- pytorch-grad-cam {reference_sess:.2f} s: torch work {torch_work:.2f} s (patch scores "
        f"{torch_seconds['get_scores']:.2f} s, base Grad-CAM {torch_seconds['base_cam']:.2f} s), the rest "
        f"{reference_sess - torch_work:.2f} s"
    )
    print(
        f"- flaxcam's floor (its jitted Grad-CAM step over the {args.batch * patch_count} patches, 32 per call): {floor_seconds:.2f} s; "
        f"flaxcam's SESS {rows[0][2]:.2f} s = {rows[0][2] / floor_seconds:.2f}× its floor"
    )
    print(
        f"- ratio at flaxcam's floor: {reference_sess / floor_seconds:.1f}× (measured: {reference_sess / rows[0][2]:.1f}×); "
        f"the base Grad-CAM alone: torch {torch_seconds['base_cam']:.2f} s vs flaxcam's floor {floor_seconds:.2f} s"
    )


def _flaxcam_floor(model, variables, nhwc, targets, sess_options, repeats, chunk=32):
    """Seconds of flaxcam's jitted Grad-CAM step (layer4) over every SESS patch of the batch, ``chunk``
    patches per call like pytorch-grad-cam's ``batch_size`` (the patches cut with SESS's own bilinear
    matrices beforehand, outside the timing), and the number of patches per image."""
    import jax
    import jax.numpy as jnp

    import flaxcam
    from flaxcam.methods.sess import patch_geometry, sess_scales

    _, height, width, channels = nhwc.shape
    window = min(height, width)
    cut_rows, cut_cols, _, _ = patch_geometry(
        height, width, window, window, sess_scales(window, sess_options["num_scales"])
    )
    crops = np.einsum("pih,bhwc,pjw->bpijc", cut_rows, nhwc, cut_cols).reshape(-1, window, window, channels)
    crop_targets = np.repeat(np.asarray(targets), cut_rows.shape[0])
    padded = -(-len(crops) // chunk) * chunk  # whole chunks: one compiled shape
    crops = jnp.asarray(np.concatenate([crops, crops[: padded - len(crops)]]), jnp.float32)
    crop_targets = jnp.asarray(np.concatenate([crop_targets, crop_targets[: padded - len(crop_targets)]]))
    step = jax.jit(flaxcam.explainer(model, method="gradcam", layer="layer4", targets="classes"))

    def floor():
        maps = [
            step(variables, crops[i : i + chunk], crop_targets[i : i + chunk]).maps for i in range(0, padded, chunk)
        ]
        jax.block_until_ready(maps)

    floor()
    return _timed(floor, repeats), cut_rows.shape[0]


if __name__ == "__main__":
    main()
