"""Parity of the noise / integration methods with torchcam 0.5 on the same converted ResNet-18 weights.

The noise is matched exactly: flaxcam draws every noise sample from its PRNG key at a documented
position (:func:`flaxcam.methods.standard_normal_at`), the test rebuilds those draws and hands them to
torchcam in its own sampling order by replacing the extractor's ``_distrib`` (a
``torch.distributions.Normal``) with an object whose ``sample(size)`` returns them. With the same
noise the maps must agree to float32 rounding, like the deterministic IS-CAM:

* SmoothGradCAM++ (noise on the input, one ``(B, 3, H, W)`` draw per sample), torchcam's defaults (4
  samples, std 0.3): at ``layer4`` two seeds, four images with different targets; at ``layer3`` (ill-
  conditioned in float32, see the test) both libraries in float64;
* SS-CAM (noise on each channel's mask, one ``(B, C, H, W)`` draw per sample) at ``layer1`` (64
  channels: 2 images with different targets × 2 samples × 64 = 256 ResNet-18 forward passes per
  library; ``layer4`` would be 2048) and the deterministic IS-CAM (one image, 2 steps), one seed each.

torchcam returns ``relu(sum_k w_k A_k)`` min-max normalized at the layer's resolution (eps 1e-8), the
same as flaxcam's ``Explanation.low_res`` (eps 1e-7): compared ≤ 1e-4.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import flaxcam
from flaxcam.methods import standard_normal_at
from flaxcam.models import load_torchvision_resnet
from tests.parity.test_cam_parity import IMAGE_SIZE, TARGETS, _make_pair

pytestmark = pytest.mark.parity

KEY = jax.random.key(42)


class InjectedNoise:
    """Stands in for torchcam's ``torch.distributions.Normal``: ``sample(size)`` returns the next of
    the given arrays (checking that torchcam asks for that shape) and counts the calls."""

    def __init__(self, torch, draws: list[np.ndarray]):
        self.torch, self.draws, self.calls = torch, draws, 0

    def sample(self, size):
        draw = self.draws[self.calls]
        assert tuple(size) == draw.shape, (tuple(size), draw.shape)
        self.calls += 1
        return self.torch.from_numpy(np.array(draw))  # a writable copy


def _layer_key():
    return jax.random.fold_in(KEY, 0)  # explain's key for the first (only) layer


def _input_noise(batch: int, samples: int, std: float) -> list[np.ndarray]:
    """flaxcam's SmoothGradCAM++ draws, as torchcam samples them: one (B, 3, H, W) array per sample."""
    draw = jax.vmap(
        jax.vmap(lambda b, s: std * standard_normal_at(_layer_key(), (b, s), (*IMAGE_SIZE, 3)), (0, None)), (None, 0)
    )
    noise = np.asarray(draw(np.arange(batch), np.arange(samples)))  # (S, B, H, W, 3)
    return list(noise.transpose(0, 1, 4, 2, 3))


def _mask_noise(batch: int, samples: int, channels: int, std: float) -> list[np.ndarray]:
    """flaxcam's SS-CAM draws, as torchcam samples them: one (B, C, H, W) array per sample."""
    per_channel = jax.vmap(
        lambda b, s, k: std * standard_normal_at(_layer_key(), (b, s, k), IMAGE_SIZE), (None, None, 0)
    )
    per_image = jax.vmap(per_channel, (0, None, None))
    return [np.asarray(per_image(np.arange(batch), s, np.arange(channels))) for s in range(samples)]


def _torchcam_maps(torch, extractor_class, reference, images, targets, noise=None, **kwargs) -> np.ndarray:
    layer = kwargs.pop("target_layer")
    with extractor_class(reference, target_layer=layer, **kwargs) as extractor:
        if noise is not None:
            extractor._distrib = InjectedNoise(torch, noise)
        with torch.no_grad():
            reference(images)
        (maps,) = extractor(class_idx=list(targets))
        if noise is not None:
            assert extractor._distrib.calls == len(noise)  # every draw used, in order
    return maps.detach().numpy()


def _assert_structured(maps: np.ndarray) -> None:
    """The comparison is not vacuous: the reference maps have structure."""
    assert (maps.reshape(len(maps), -1).std(axis=1) > 0.05).all()


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def resnet18_pair(request):
    return _make_pair(request.param)


def test_smoothgradcam_plusplus_equals_torchcam_with_the_same_noise(resnet18_pair):
    from torchcam.methods import SmoothGradCAMpp

    torch, reference, model, variables, images = resnet18_pair
    noise = _input_noise(4, 4, 0.3)
    ref = _torchcam_maps(
        torch, SmoothGradCAMpp, reference, images, TARGETS, noise, target_layer="layer4", num_samples=4, std=0.3
    )
    ours = flaxcam.explain(
        model,
        variables,
        images.numpy().transpose(0, 2, 3, 1),
        method="smoothgradcam++",
        layer="layer4",
        targets=TARGETS,
        key=KEY,
    )
    _assert_structured(ref)
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref).max() <= 1e-4
    # the noise matters: with other draws the maps differ
    other = flaxcam.explain(
        model,
        variables,
        images.numpy().transpose(0, 2, 3, 1),
        method="smoothgradcam++",
        layer="layer4",
        targets=TARGETS,
        key=jax.random.key(7),
    )
    assert np.abs(np.asarray(other.low_res)[:, 0] - ref).max() > 0.05


def test_smoothgradcam_plusplus_equals_torchcam_in_float64_at_layer3():
    """At ``layer3`` the Grad-CAM++ weights are ill-conditioned in float32 (the denominator
    ``2 D2 + sum A D3`` nearly cancels for some channels: torchcam's own float32 maps are ~1e-2 away
    from the same computation in float64), so both libraries run in float64 — same weights, images
    and noise — and must agree ≤ 1e-6. One seed, two images with different targets."""
    torch, reference, _, _, images = _make_pair(0)
    from torchcam.methods import SmoothGradCAMpp

    images, targets = images[:2].double(), TARGETS[:2]
    reference = reference.double()
    noise = [n.astype(np.float64) for n in _input_noise(2, 4, 0.3)]
    ref = _torchcam_maps(
        torch, SmoothGradCAMpp, reference, images, targets, noise, target_layer="layer3", num_samples=4, std=0.3
    )
    with jax.enable_x64(True):
        model, variables = load_torchvision_resnet(reference.state_dict(), dtype=np.float64)
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables)
        ours = flaxcam.explain(
            model,
            variables,
            images.numpy().transpose(0, 2, 3, 1),
            method="smoothgradcam++",
            layer="layer3",
            targets=targets,
            key=KEY,
        )
        assert ours.low_res.dtype == np.float64
        low = np.asarray(ours.low_res)[:, 0]
    _assert_structured(ref)
    assert np.abs(low - ref).max() <= 1e-6


@pytest.mark.optimized
def test_sscam_equals_torchcam_with_the_same_noise():
    torch, reference, model, variables, images = _make_pair(0)
    from torchcam.methods import SSCAM

    images, targets = images[:2], TARGETS[:2]
    noise = _mask_noise(2, 2, 64, 2.0)
    ref = _torchcam_maps(
        torch, SSCAM, reference, images, targets, noise, target_layer="layer1", batch_size=64, num_samples=2, std=2.0
    )
    ours = flaxcam.explain(
        model,
        variables,
        images.numpy().transpose(0, 2, 3, 1),
        method="sscam",
        layer="layer1",
        targets=targets,
        key=KEY,
        chunk_size=64,
        method_options={"num_samples": 2, "std": 2.0},
    )
    _assert_structured(ref)
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref).max() <= 1e-4


@pytest.mark.optimized
def test_iscam_equals_torchcam():
    torch, reference, model, variables, images = _make_pair(1)
    from torchcam.methods import ISCAM

    images, targets = (
        images[2:3],
        TARGETS[2:3],
    )  # deterministic: one image (batch indexing is tested in tests/test_noise_methods.py)
    ref = _torchcam_maps(torch, ISCAM, reference, images, targets, target_layer="layer1", batch_size=64, num_samples=2)
    ours = flaxcam.explain(
        model,
        variables,
        images.numpy().transpose(0, 2, 3, 1),
        method="iscam",
        layer="layer1",
        targets=targets,
        chunk_size=64,
        method_options={"num_samples": 2},
    )
    _assert_structured(ref)
    assert np.abs(np.asarray(ours.low_res)[:, 0] - ref).max() <= 1e-4
