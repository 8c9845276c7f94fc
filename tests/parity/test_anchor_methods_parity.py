"""Parity of FEM, RefineCAM, ShapleyCAM with the ReST target, SegEigenCAM and Guided Grad-CAM with
pytorch-grad-cam 1.5.7 on the same weights.

The setting of ``test_cam_parity.py``: torchvision ResNet-18 with random weights (two seeds, seed 1 in
float64) and randomized BatchNorm statistics, converted with ``flaxcam.models.load_torchvision_resnet``;
4 random images at 96×128 with a different target class per image; ``layer4`` and ``layer3``.
Low-resolution maps ≤ 1e-4, upsampled maps ≤ 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

import flaxcam
from tests.parity.test_cam_parity import FLOAT64_SEEDS, TARGETS, _make_pair, _record_raw_maps

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def resnet18_pair(request):
    torch, reference, model, variables, images = _make_pair(request.param, float64=request.param in FLOAT64_SEEDS)
    return torch, reference, model, variables, images, images.numpy().transpose(0, 2, 3, 1)


def _targets(classes=TARGETS):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(c) for c in classes]


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_fem_equals_pytorch_grad_cam(resnet18_pair, layer):
    from pytorch_grad_cam import FEM
    from pytorch_grad_cam.utils.image import scale_cam_image

    _, reference, model, variables, images, nhwc = resnet18_pair
    with FEM(model=reference, target_layers=[getattr(reference, layer)]) as cam:
        raw_maps = _record_raw_maps(cam)
        ref_up = cam(input_tensor=images, targets=_targets())
        ref_low = scale_cam_image(np.maximum(raw_maps[0], 0))
    ours = flaxcam.explain(model, variables, nhwc, method="fem", layer=layer, targets=TARGETS)
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref_low).max() <= 1e-4
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    assert (ref_low.reshape(4, -1).std(axis=1) > 0.05).all()
    # the k-sigma weights matter: the plain channel sum (every weight equal) differs
    plain = np.asarray(ours.raw)[:, 0]
    summed = flaxcam.explain(model, variables, nhwc, method="fem", layer=layer, method_options={"k": 0.0}).raw
    assert np.abs(np.asarray(summed)[:, 0] - plain).max() > 1e-3 * np.abs(plain).max()


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_shapleycam_with_the_rest_target_equals_pytorch_grad_cam(resnet18_pair, layer):
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST

    _, reference, model, variables, images, nhwc = resnet18_pair
    with ShapleyCAM(model=reference, target_layers=[getattr(reference, layer)]) as cam:
        raw_maps = _record_raw_maps(cam)
        ref_up = cam(input_tensor=images, targets=[ClassifierOutputReST(c) for c in TARGETS])
        ref_low = scale_cam_image(np.maximum(raw_maps[0], 0))
    ours = flaxcam.explain(model, variables, nhwc, method="shapleycam", layer=layer, targets=TARGETS, score="rest")
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref_low).max() <= 1e-4
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    scale = np.abs(raw_maps[0]).max(axis=(1, 2))
    assert (np.abs(np.asarray(ours.raw)[:, 0] - raw_maps[0]).max(axis=(1, 2)) <= 1e-4 * scale).all()
    # the ReST score's Hessian term is not zero: ShapleyCAM differs from Grad-CAM of the same score
    plain = flaxcam.explain(model, variables, nhwc, method="gradcam", layer=layer, targets=TARGETS, score="rest")
    assert np.abs(np.asarray(plain.low_res) - np.asarray(ours.low_res)).max() > 0.05


def test_refinecam_equals_pytorch_grad_cam(resnet18_pair):
    """pytorch-grad-cam's RefineCAM (base Grad-CAM++) over layer3 and layer4: the product of the
    per-layer input-resolution maps."""
    from pytorch_grad_cam import RefineCAM

    _, reference, model, variables, images, nhwc = resnet18_pair
    cam = RefineCAM(model=reference, target_layers=[reference.layer3, reference.layer4])
    ref_up = cam(input_tensor=images, targets=_targets())
    for base in cam.base_cam_per_layer:
        base.activations_and_grads.release()
    layers = ["layer3", "layer4"]
    ours = flaxcam.explain(model, variables, nhwc, method="refinecam", layer=layers, targets=TARGETS)
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    assert (ref_up.reshape(4, -1).std(axis=1) > 0.05).all()
    # per layer, RefineCAM is Grad-CAM++; the product fusion differs from the mean of the same maps
    plus = flaxcam.explain(model, variables, nhwc, method="gradcam++", layer=layers, targets=TARGETS)
    for ours_low, plus_low in zip(ours.low_res, plus.low_res):
        np.testing.assert_array_equal(np.asarray(ours_low), np.asarray(plus_low))
    assert np.abs(np.asarray(plus.maps) - np.asarray(ours.maps)).max() > 0.05


SEGMENTATION_CLASSES = [0, 1, 2, 3]


def _fcn_pair(torch, reference, variables, float64: bool):
    """pytorch-grad-cam's segmentation setting on the ResNet-18 pair: the trunk (``layer4``'s output)
    → a 1x1 conv to 4 classes → bilinear upsampling to the input (``F.interpolate``,
    ``align_corners=False``), and flaxcam's :func:`flaxcam.models.fcn_resnet18` with the same weights."""
    import torch.nn.functional as F

    from flaxcam.models.segmentation import fcn_resnet18

    classifier = torch.nn.Conv2d(512, len(SEGMENTATION_CLASSES), 1)
    with torch.no_grad():
        classifier.weight.copy_(0.05 * torch.randn(classifier.weight.shape, generator=torch.Generator().manual_seed(5)))
    classifier = classifier.double() if float64 else classifier

    class TorchFCN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.classifier = reference, classifier

        def forward(self, x):
            r, size = self.backbone, x.shape[-2:]
            x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
            features = r.layer4(r.layer3(r.layer2(r.layer1(x))))
            return F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)

    torch_fcn = TorchFCN().eval()
    params = {name: value for name, value in variables["params"].items() if name != "fc"}
    dtype = np.float64 if float64 else np.float32
    fcn_variables = {
        "params": {
            "backbone": params,
            "classifier": {
                "kernel": classifier.weight.detach().numpy().transpose(2, 3, 1, 0).astype(dtype),
                "bias": classifier.bias.detach().numpy().astype(dtype),
            },
        },
        "batch_stats": {"backbone": variables["batch_stats"]},
    }
    return torch_fcn, fcn_resnet18(num_classes=len(SEGMENTATION_CLASSES), dtype=dtype), fcn_variables


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_segeigencam_on_a_segmentation_model_equals_pytorch_grad_cam(resnet18_pair, layer):
    from pytorch_grad_cam import SegEigenCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from flaxcam.targets import Segmentation

    torch, reference, _, variables, images, nhwc = resnet18_pair
    float64 = images.dtype == torch.float64
    torch_fcn, fcn, fcn_variables = _fcn_pair(torch, reference, variables, float64)
    height, width = images.shape[-2:]
    masks = np.zeros((4, height, width), np.float32)
    for index in range(4):  # a different region per image
        masks[index, 8 * index : 8 * index + 48, 10 * index : 10 * index + 64] = 1
    with torch.no_grad():
        np.testing.assert_allclose(
            np.asarray(fcn.apply(fcn_variables, nhwc)), torch_fcn(images).numpy().transpose(0, 2, 3, 1), atol=1e-4
        )
    targets = [SemanticSegmentationTarget(c, m) for c, m in zip(SEGMENTATION_CLASSES, masks)]
    with SegEigenCAM(model=torch_fcn, target_layers=[getattr(reference, layer)]) as cam:
        raw_maps = _record_raw_maps(cam)
        ref_up = cam(input_tensor=images, targets=targets)
        ref_low = scale_cam_image(np.maximum(raw_maps[0], 0))
    ours = flaxcam.explain(
        fcn,
        fcn_variables,
        nhwc,
        method="segeigencam",
        layer=f"backbone.{layer}",
        targets=Segmentation(SEGMENTATION_CLASSES, masks),
    )
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref_low).max() <= 1e-4
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    scale = np.abs(raw_maps[0]).max(axis=(1, 2))
    assert (np.abs(np.asarray(ours.raw)[:, 0] - raw_maps[0]).max(axis=(1, 2)) <= 1e-4 * scale).all()
    # the gradient weighting matters: EigenCAM of the activations alone differs
    eigen = flaxcam.explain(
        fcn,
        fcn_variables,
        nhwc,
        method="eigencam",
        layer=f"backbone.{layer}",
        targets=Segmentation(SEGMENTATION_CLASSES, masks),
    )
    assert np.abs(np.asarray(eigen.low_res) - np.asarray(ours.low_res)).max() > 0.05


def _reference_guided_gradients(reference, images, classes=TARGETS) -> np.ndarray:
    """pytorch-grad-cam's GuidedBackpropReLUModel, one image at a time (it explains image 0): (B, H, W, 3)."""
    from pytorch_grad_cam import GuidedBackpropReLUModel

    guided = GuidedBackpropReLUModel(model=reference, device="cpu")
    return np.stack([guided(images[i : i + 1].clone(), target_category=c) for i, c in enumerate(classes)])


@pytest.mark.optimized
def test_guided_backprop_and_guided_gradcam_equal_pytorch_grad_cam(resnet18_pair):
    """flaxcam's model is not edited: its ReLUs (function calls) are rewritten in the traced program."""
    import copy

    from pytorch_grad_cam import GradCAM

    from flaxcam.guided import guided_gradcam, guided_gradients

    _, reference, model, variables, images, nhwc = resnet18_pair
    reference = copy.deepcopy(reference)  # the reference swaps its ReLU modules (and back, not in place)
    ref = _reference_guided_gradients(reference, images)
    ours, chosen = guided_gradients(model, variables, nhwc, targets=TARGETS)
    ours = np.asarray(ours)[:, 0]
    assert ours.shape == ref.shape == (4, *nhwc.shape[1:])
    np.testing.assert_array_equal(np.asarray(chosen)[:, 0], TARGETS)
    scale = np.abs(ref).max(axis=(1, 2, 3))
    assert (np.abs(ours - ref).max(axis=(1, 2, 3)) <= 1e-4 * scale).all()
    # guided, not plain: the ordinary input gradient differs
    from flaxcam.probe import input_and_layer_gradients
    from flaxcam.targets import TargetSpec, target_scores

    spec, data = TargetSpec("classes", 1), {"classes": np.asarray(TARGETS, np.int32)[:, None]}
    plain = np.asarray(
        input_and_layer_gradients(model, variables, nhwc, (), lambda o: target_scores(spec, o, data))[3]
    )[:, 0]
    assert (np.abs(plain - ref).max(axis=(1, 2, 3)) > 0.1 * scale).all()

    # Guided Grad-CAM: pytorch-grad-cam's example, cam_mask * gb, with the Grad-CAM map at layer4
    with GradCAM(model=reference, target_layers=[reference.layer4]) as cam:
        ref_cam = cam(input_tensor=images, targets=_targets())
    ref_guided_cam = ref_cam[..., None] * ref
    ours_guided_cam = np.asarray(guided_gradcam(model, variables, nhwc, layer="layer4", targets=TARGETS))[:, 0]
    assert (np.abs(ours_guided_cam - ref_guided_cam).max(axis=(1, 2, 3)) <= 1e-3 * scale).all()

    # the registered method: the largest absolute guided gradient over channels, normalized
    explanation = flaxcam.explain(model, variables, nhwc, method="guided_backprop", targets=TARGETS)
    assert explanation.layer == "input"
    magnitude = np.abs(ref).max(axis=-1)
    expected = magnitude - magnitude.min(axis=(1, 2), keepdims=True)
    expected = expected / (1e-7 + expected.max(axis=(1, 2), keepdims=True))
    assert np.abs(np.asarray(explanation.maps)[:, 0] - expected).max() <= 1e-3


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_deep_feature_factorization_equals_pytorch_grad_cam(resnet18_pair, layer):
    """Same NMF (scikit-learn's coordinate descent from its random init, seed 0) on device: the same
    objective, the same concepts up to their order (matched by the correlation of their heatmaps),
    the same input-resolution heatmaps and the same head scores of the concepts."""
    import itertools

    from pytorch_grad_cam import DeepFeatureFactorization

    from flaxcam.dff import deep_feature_factorization

    torch, reference, model, variables, images, nhwc = resnet18_pair
    components = 4
    head = lambda concepts: reference.fc(concepts.to(images.dtype))
    factorization = DeepFeatureFactorization(
        reference, getattr(reference, layer), computation_on_concepts=head if layer == "layer4" else None
    )
    with torch.no_grad():
        result = factorization(images, n_components=components)
    factorization.activations_and_grads.release()
    ref_concepts, ref_heatmaps = result[0], np.stack(result[1])  # (C, k), (B, k, H, W)
    ours = deep_feature_factorization(
        model, variables, nhwc, layer=layer, n_components=components, head="fc" if layer == "layer4" else None
    )
    ours_heatmaps = np.asarray(ours.heatmaps)
    flat = lambda maps: maps.transpose(1, 0, 2, 3).reshape(components, -1)
    correlation = np.corrcoef(flat(ours_heatmaps), flat(ref_heatmaps))[:components, components:]
    order = max(
        itertools.permutations(range(components)), key=lambda p: sum(correlation[i, p[i]] for i in range(components))
    )
    assert min(correlation[i, order[i]] for i in range(components)) > 0.999
    assert np.abs(ours_heatmaps - ref_heatmaps[:, list(order)]).max() <= 1e-3
    concepts = np.asarray(ours.concepts)
    np.testing.assert_allclose(concepts, ref_concepts[:, list(order)], atol=1e-3 * np.abs(ref_concepts).max())
    # the objective of each factorization, on the same shifted activation matrix
    activations = {}
    hook = getattr(reference, layer).register_forward_hook(lambda m, i, o: activations.update(a=o.detach().numpy()))
    with torch.no_grad():
        reference(images)
    hook.remove()
    matrix = activations["a"].transpose(1, 0, 2, 3).reshape(concepts.shape[0], -1)
    offset = matrix.min(axis=1, keepdims=True)
    objective = float(ours.objective)
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import (
        dff as reference_dff,
    )

    ref_w, ref_h = reference_dff(activations["a"].copy(), n_components=components)
    ref_objective = 0.5 * np.sum(
        (matrix - offset - (ref_w - offset) @ ref_h.transpose(1, 0, 2, 3).reshape(components, -1)) ** 2
    )
    assert abs(objective - ref_objective) <= 1e-3 * ref_objective
    if layer == "layer4":
        np.testing.assert_allclose(np.asarray(ours.scores), result[2][list(order)], atol=1e-3 * np.abs(result[2]).max())


@pytest.mark.optimized
@pytest.mark.parametrize(
    ("layer", "options"),
    [
        ("layer4", {"num_scales": 3}),
        ("layer3", {"base": "hirescam", "num_scales": 3, "step_size": 64, "pre_filter_ratio": 0.25, "pool": "max"}),
    ],
    ids=["gradcam-defaults", "hirescam-overlapping-prefiltered-max"],
)
def test_sess_equals_pytorch_grad_cam(resnet18_pair, layer, options):
    """Every patch of every image in one chunked, jitted loop vs pytorch-grad-cam's per-image loop.

    The second setting runs on the float64 pair only: in float32 the patches cut by flaxcam's bilinear
    matrices differ from torchvision's antialiased resize by up to 5.3e-5 (measured), and at layer3 one
    patch of image 0 (seed 0) sits within that of a ReLU / max-pool tie: its HiResCAM map moves by 9.4e-3."""
    import pytorch_grad_cam
    from pytorch_grad_cam import SESS

    torch, reference, model, variables, images, nhwc = resnet18_pair
    if layer == "layer3" and images.dtype != torch.float64:
        pytest.skip("float32 patches are within rounding of a ReLU / max-pool tie here; compared in float64")
    base = {"gradcam": "GradCAM", "hirescam": "HiResCAM"}[options.get("base", "gradcam")]
    reference_options = {key: value for key, value in options.items() if key != "base"}
    with SESS(
        model=reference,
        target_layers=[getattr(reference, layer)],
        base_method=getattr(pytorch_grad_cam, base),
        **reference_options,
    ) as cam:
        ref = cam(input_tensor=images, targets=_targets())
    ours = flaxcam.explain(
        model, variables, nhwc, method="sess", layer=layer, targets=TARGETS, method_options=options, chunk_size=16
    )
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref).max() <= 1e-3
    assert (ref.reshape(4, -1).std(axis=1) > 0.05).all()
    # the patches matter: the base method on the whole image differs
    plain = flaxcam.explain(model, variables, nhwc, method=options.get("base", "gradcam"), layer=layer, targets=TARGETS)
    assert np.abs(np.asarray(plain.maps)[:, 0] - ref).max() > 0.05
