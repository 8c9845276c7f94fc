"""3-D inputs: Grad-CAM, HiResCAM, LayerCAM and FEM on a small 3-D CNN equal pytorch-grad-cam 1.5.7 on
the same weights (its 5-D activation path: maps over (depth, height, width), upsampled to the input
volume with ``scipy.ndimage.zoom``). Low-resolution maps ≤ 1e-4, upsampled ≤ 1e-3."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest

import flaxcam
from tests.parity.test_cam_parity import _record_raw_maps
from tests.torch_ref import require_torch

pytestmark = pytest.mark.parity

VOLUME = (10, 12, 14)  # depth, height, width
CLASSES = [0, 3, 1]


class Block3D(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(self.features, (3, 3, 3), strides=self.strides, padding=1, name="conv")
        return nn.relu(conv(x))


class Small3DCNN(nn.Module):
    """conv3d(1 → 6) → ReLU → conv3d(6 → 8, stride 2) → ReLU → global average pool → Dense(4)."""

    @nn.compact
    def __call__(self, x):
        x = Block3D(6, name="block1")(x)
        x = Block3D(8, strides=2, name="block2")(x)
        return nn.Dense(4, name="fc")(x.mean(axis=(1, 2, 3)))


def _torch_pair(seed: int):
    torch, _ = require_torch()
    torch.manual_seed(seed)
    module_base: Any = torch.nn.Module  # torch comes from require_torch(), untyped

    class TorchSmall3DCNN(module_base):
        def __init__(self):
            super().__init__()
            self.block1 = torch.nn.Sequential(torch.nn.Conv3d(1, 6, 3, padding=1), torch.nn.ReLU())
            self.block2 = torch.nn.Sequential(torch.nn.Conv3d(6, 8, 3, stride=2, padding=1), torch.nn.ReLU())
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.block2(self.block1(x)).mean(dim=(2, 3, 4)))

    reference = TorchSmall3DCNN().eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.bias.copy_(0.1 * torch.randn(module.bias.shape))
    conv = lambda c: {"kernel": c.weight.detach().numpy().transpose(2, 3, 4, 1, 0), "bias": c.bias.detach().numpy()}
    variables = {
        "params": {
            "block1": {"conv": conv(reference.block1[0])},
            "block2": {"conv": conv(reference.block2[0])},
            "fc": {"kernel": reference.fc.weight.detach().numpy().T, "bias": reference.fc.bias.detach().numpy()},
        }
    }
    volumes = torch.randn((3, 1, *VOLUME), generator=torch.Generator().manual_seed(seed + 7))
    return torch, reference, Small3DCNN(), jax.tree_util.tree_map(np.asarray, variables), volumes


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def volume_pair(request):
    return _torch_pair(request.param)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "fem"])
@pytest.mark.parametrize("layer", ["block2", "block1"])
def test_3d_methods_equal_pytorch_grad_cam(volume_pair, method, layer):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch, reference, model, variables, volumes = volume_pair
    ndhwc = volumes.numpy().transpose(0, 2, 3, 4, 1)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(model.apply(variables, ndhwc)), reference(volumes).numpy(), atol=1e-5)
    cam_class = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "layercam": "LayerCAM", "fem": "FEM"}[method]
    with getattr(pytorch_grad_cam, cam_class)(model=reference, target_layers=[getattr(reference, layer)]) as cam:
        raw_maps = _record_raw_maps(cam)
        ref_up = cam(input_tensor=volumes, targets=[ClassifierOutputTarget(c) for c in CLASSES])
        ref_low = scale_cam_image(np.maximum(raw_maps[0], 0))
    ours = flaxcam.explain(model, variables, ndhwc, method=method, layer=layer, targets=CLASSES)
    assert ours.low_res.shape[2:] == ref_low.shape[1:] and ref_low.ndim == 4  # (B, d, h, w)
    assert ours.maps.shape == (3, 1, *VOLUME) == (3, 1, *ref_up.shape[1:])
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref_low).max() <= 1e-4
    assert np.abs(np.asarray(ours.maps)[:, 0] - ref_up).max() <= 1e-3
    assert (ref_low.reshape(3, -1).std(axis=1) > 0.05).sum() >= 2  # not vacuous (a map may be negative everywhere)
