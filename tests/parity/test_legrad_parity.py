"""LeGrad parity with torchcam 0.5 (``torchcam.methods.LeGrad``) on the same weights.

A small torchvision ``VisionTransformer`` (32×32 images, 8×8 patches → a 4×4 grid, 4 blocks of width
24 with 3 heads, 10 classes) with every parameter drawn at random (torchvision zero-initializes the
head), converted with ``flaxcam.models.convert_torchvision_vit``; 3 random images, two target classes
per image (each explained by one torchcam call with a class per image); two seeds, seed 1 in float64
on both sides. Blocks: the last two (torchcam's example takes the last ones) and every block
(flaxcam's default ``layer=None``).

Conventions matched:
* torchcam returns the layer-averaged relevance min-max normalized with eps 1e-8 (no ReLU is needed: it
  is a mean of ReLUs). flaxcam's ``raw`` with the same normalization, and its ``low_res`` (eps 1e-7), are
  compared ≤ 1e-4; the unnormalized relevance (``normalized=False``) ≤ 1e-4 of its scale.
* upsampled: torchcam does not upsample; its map resized with ``F.interpolate(mode="bilinear",
  align_corners=False)`` (half-pixel centres, as ``jax.image.resize``) and min-max normalized again is
  compared with ``Explanation.maps`` ≤ 1e-3.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import flaxcam
from flaxcam.models import convert_torchvision_vit
from tests.torch_ref import require_torch

pytestmark = pytest.mark.parity

IMAGE_SIZE, PATCH, DEPTH, HEADS, DIM = 32, 8, 4, 3, 24
TARGETS = np.array([[3, 7], [0, 5], [9, 2]])  # two classes per image, different per image
FLOAT64_SEEDS = (1,)


def _make_pair(seed: int):
    """``(torch, reference, model, variables, images, float64)``; float64 on both sides for
    :data:`FLOAT64_SEEDS`."""
    torch, torchvision = require_torch()
    float64 = seed in FLOAT64_SEEDS
    generator = torch.Generator().manual_seed(seed)
    reference = torchvision.models.VisionTransformer(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=DIM,
        mlp_dim=2 * DIM,
        num_classes=10,
    )
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    reference.eval()
    images = torch.randn((len(TARGETS), 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    if float64:
        reference, images = reference.double(), images.double()
    with jax.enable_x64(float64):
        model, variables = convert_torchvision_vit(
            reference.state_dict(), heads=HEADS, dtype=np.float64 if float64 else np.float32
        )
    return torch, reference, model, variables, images, float64


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1-float64"])
def vit_pair(request):
    return _make_pair(request.param)


def _torchcam_legrad(torch, reference, images, blocks: list[int], classes, normalized: bool) -> np.ndarray:
    from torchcam.methods import LeGrad

    with LeGrad(reference, [reference.encoder.layers[i] for i in blocks]) as extractor:
        reference(images)  # gradient tracking on: LeGrad differentiates the attention
        (maps,) = extractor(class_idx=[int(c) for c in classes], normalized=normalized)
    return maps.detach().numpy()


def _normalized(maps: np.ndarray, eps: float) -> np.ndarray:
    shifted = maps - maps.min(axis=(-2, -1), keepdims=True)
    return shifted / (shifted.max(axis=(-2, -1), keepdims=True) + eps)


@pytest.mark.parametrize("blocks", [[2, 3], None], ids=["last-two-blocks", "every-block"])
def test_legrad_equals_torchcam(vit_pair, blocks):
    torch, reference, model, variables, images, float64 = vit_pair
    chosen = list(range(DEPTH)) if blocks is None else blocks
    layer = None if blocks is None else [f"blocks_{i}" for i in blocks]
    with jax.enable_x64(float64):
        ours = flaxcam.explain(
            model, variables, images.numpy().transpose(0, 2, 3, 1), method="legrad", layer=layer, targets=TARGETS
        )
        assert ours.layer == tuple(f"blocks_{i}" for i in chosen)
        raw, low_res, maps = (np.asarray(values) for values in (ours.raw, ours.low_res, ours.maps))
    assert raw.shape == low_res.shape == (3, 2, 4, 4) and maps.shape == (3, 2, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(np.asarray(ours.targets), TARGETS)
    with torch.no_grad():
        logits = reference(images).numpy()
    np.testing.assert_allclose(np.asarray(ours.logits), logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    for t in range(TARGETS.shape[1]):
        ref = _torchcam_legrad(torch, reference, images, chosen, TARGETS[:, t], normalized=True)
        assert (ref.reshape(len(ref), -1).std(axis=1) > 0.05).all()  # structured: the comparison is not vacuous
        assert np.abs(_normalized(raw[:, t], 1e-8) - ref).max() <= 1e-4
        assert np.abs(low_res[:, t] - ref).max() <= 1e-4
        unnormalized = _torchcam_legrad(torch, reference, images, chosen, TARGETS[:, t], normalized=False)
        assert np.abs(raw[:, t] - unnormalized).max() <= 1e-4 * np.abs(unnormalized).max()
        upsampled = torch.nn.functional.interpolate(
            torch.from_numpy(ref)[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )[:, 0].numpy()
        assert np.abs(maps[:, t] - _normalized(upsampled, 1e-7)).max() <= 1e-3
