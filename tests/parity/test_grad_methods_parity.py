"""Parity of FullGrad, ShapleyCAM and FinerCAM with pytorch-grad-cam 1.5.7 on the same weights.

The setting of ``test_cam_parity.py``: torchvision ResNet-18 with random weights (two seeds) and
randomized BatchNorm statistics, converted with ``flaxcam.models.load_torchvision_resnet``; 4 random
images at 96×128 with a different target class per image; ``layer4`` and ``layer3``. Low-resolution
maps (where both libraries define them) ≤ 1e-4, upsampled maps ≤ 1e-3.

* FullGrad reads every BatchNorm of the network (the convolutions have no bias) and the input; it has
  no layer resolution, so only its input-resolution map is compared.
* ShapleyCAM's Hessian term vanishes for a ReLU network's logit (ShapleyCAM = Grad-CAM there), so it is
  compared on the softmax probability (``ClassifierOutputSoftmaxTarget`` / ``score="softmax"``), where
  the Hessian-vector product is not zero — the test checks that it changes the map.
* FinerCAM is compared with per-image target classes (``FinerWeightedTarget`` with the comparison
  classes chosen by ``FinerCAM.forward``'s rule: ranks 1–3 of ``argsort(|y - y_c|)``) and with the
  library's own default (``targets=None``: each image's top class, comparisons chosen by the library).
"""

from __future__ import annotations

import numpy as np
import pytest

import flaxcam
from tests.parity.test_cam_parity import FLOAT64_SEEDS, IMAGE_SIZE, TARGETS, _make_pair, _record_raw_maps

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def resnet18_pair(request):
    torch, reference, model, variables, images = _make_pair(request.param, float64=request.param in FLOAT64_SEEDS)
    return torch, reference, model, variables, images, images.numpy().transpose(0, 2, 3, 1)


@pytest.mark.optimized
def test_fullgrad_equals_pytorch_grad_cam(resnet18_pair):
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, reference, model, variables, images, nhwc = resnet18_pair
    with FullGrad(model=reference, target_layers=[]) as cam:
        assert len(cam.target_layers) == 20  # every BatchNorm2d of ResNet-18 (its convs have no bias)
        ref = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in TARGETS])
    ours = flaxcam.explain(model, variables, nhwc, method="fullgrad", targets=TARGETS)
    assert ours.layer == "input+biases"
    maps = np.asarray(ours.maps)[:, 0]
    assert maps.shape == ref.shape == (4, *IMAGE_SIZE)
    assert np.abs(maps - ref).max() <= 1e-3
    assert (ref.reshape(4, -1).std(axis=1) > 0.05).all()
    # the bias terms matter: the input term alone (|x * grad x|, per channel normalized) differs
    plain = flaxcam.explain(model, variables, nhwc, method="gradcam", targets=TARGETS)
    assert np.abs(np.asarray(plain.maps)[:, 0] - ref).max() > 0.05


def _assert_raw_maps_agree(ours: np.ndarray, reference: np.ndarray, reference_low: np.ndarray) -> None:
    """The maps before ReLU agree for every image (relative to each map's scale), so images whose map
    is negative everywhere (all zeros after the ReLU, legitimately) are compared too; and the
    comparison is not vacuous: the reference maps are not zero, and at least one normalized map has
    structure (for the softmax score of a random-weight network most maps are negative everywhere)."""
    scale = np.abs(reference).max(axis=(1, 2))
    assert (scale > 0).all()
    assert (np.abs(ours - reference).max(axis=(1, 2)) <= 1e-4 * scale).all()
    assert (reference_low.reshape(len(reference_low), -1).std(axis=1) > 0.05).sum() >= 1


def _softmax_targets(classes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    return [ClassifierOutputSoftmaxTarget(c) for c in classes]


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_shapleycam_equals_pytorch_grad_cam(resnet18_pair, layer):
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    _, reference, model, variables, images, nhwc = resnet18_pair
    with ShapleyCAM(model=reference, target_layers=[getattr(reference, layer)]) as cam:
        raw_maps = _record_raw_maps(cam)
        ref_up = cam(input_tensor=images, targets=_softmax_targets(TARGETS))
        ref_low = scale_cam_image(np.maximum(raw_maps[0], 0))
    ours = flaxcam.explain(model, variables, nhwc, method="shapleycam", layer=layer, targets=TARGETS, score="softmax")
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref_low).max() <= 1e-4
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    _assert_raw_maps_agree(np.asarray(ours.raw)[:, 0], raw_maps[0], ref_low)
    # the Hessian term is not negligible: Grad-CAM of the same softmax score differs
    plain = flaxcam.explain(model, variables, nhwc, method="gradcam", layer=layer, targets=TARGETS, score="softmax")
    assert np.abs(np.asarray(plain.low_res) - np.asarray(ours.low_res)).max() > 0.05


def _finer_targets(logits: np.ndarray, classes) -> list:
    """FinerCAM.forward's rule, with a given main class per image: the comparison classes are ranks
    1, 2, 3 of argsort(|y - y_main|)."""
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    targets = []
    for row, main in zip(logits, classes):
        order = np.argsort(np.abs(row - row[main]))
        assert order[0] == main
        targets.append(FinerWeightedTarget(int(main), [int(order[i]) for i in (1, 2, 3)], 1.0))
    return targets


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_finercam_equals_pytorch_grad_cam(resnet18_pair, layer):
    from pytorch_grad_cam import FinerCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch, reference, model, variables, images, nhwc = resnet18_pair
    with torch.no_grad():
        logits = reference(images).numpy()
    with FinerCAM(model=reference, target_layers=[getattr(reference, layer)]) as cam:
        raw_maps = _record_raw_maps(cam.base_cam)
        ref_up = cam(input_tensor=images, targets=_finer_targets(logits, TARGETS))
        ref_low = scale_cam_image(np.maximum(raw_maps[0], 0))
    ours = flaxcam.explain(model, variables, nhwc, method="finercam", layer=layer, targets=TARGETS)
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref_low).max() <= 1e-4
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    _assert_raw_maps_agree(np.asarray(ours.raw)[:, 0], raw_maps[0], ref_low)
    # comparing against similar classes changes the map (Grad-CAM of the plain logit differs)
    plain = flaxcam.explain(model, variables, nhwc, method="gradcam", layer=layer, targets=TARGETS)
    assert np.abs(np.asarray(plain.low_res) - np.asarray(ours.low_res)).max() > 0.05


def test_finercam_default_targets_equal_pytorch_grad_cam(resnet18_pair):
    """``targets=None``: the library picks each image's top class and its comparison classes itself."""
    from pytorch_grad_cam import FinerCAM

    _, reference, model, variables, images, nhwc = resnet18_pair
    with FinerCAM(model=reference, target_layers=[reference.layer4]) as cam:
        ref_up = cam(input_tensor=images, targets=None)
    ours = flaxcam.explain(model, variables, nhwc, method="finercam", layer="layer4")
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
