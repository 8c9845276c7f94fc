"""Parity of FEM, RefineCAM, ShapleyCAM with the ReST target, SegEigenCAM and Guided Grad-CAM with
pytorch-grad-cam 1.5.7 on the same weights.

The setting of ``test_cam_parity.py``: torchvision ResNet-18 with random weights (two seeds, seed 1 in
float64) and randomized BatchNorm statistics, converted with ``flaxcam.models.load_torchvision_resnet``;
4 random images at 96×128 with a different target class per image; ``layer4`` and ``layer3``.
Low-resolution maps ≤ 1e-4, upsampled maps ≤ 1e-3.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_cam_parity import FLOAT64_SEEDS, TARGETS, _make_pair, _record_raw_maps  # noqa: E402

import flaxcam  # noqa: E402

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
