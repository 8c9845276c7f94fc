"""Parity of flaxcam.evaluation with pytorch-grad-cam 1.5.7 (``pytorch_grad_cam.metrics``) and torchcam
0.5 (``torchcam.metrics``) on the same ResNet-18 weights, images, maps and targets, float64 on both sides.

Setting: torchvision ResNet-18 with random weights and randomized BatchNorm (``_make_pair`` of
``test_cam_parity.py``, seed 0) converted to flaxcam, both run in float64; 2 images at 48×64 with a
different class each; smooth random maps in [0, 1] (no ties, so percentile thresholds and pixel orders
are unambiguous).

Conventions of the references:
* pytorch-grad-cam's ROAD imputer only accepts a float32 input tensor (it writes its float32 solution
  into a clone of the input); the torch model casts that input to float64, and flaxcam imputes the same
  float32 values in float64 — the imputed pixels then differ by float32 rounding only (~1e-7).
* its imputation noise (``0.01 * torch.randn_like``) cannot be matched draw for draw, so the ROAD
  comparisons patch ``torch.randn_like`` to zeros on the reference and use ``noise=0`` in flaxcam.
* torchcam's metrics take a CAM extractor: a stand-in returns the given maps at the input resolution,
  so its ``interpolate(..., align_corners=False)`` to the same size is the identity.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcam import evaluation
from flaxcam.models import load_torchvision_resnet
from tests.torch_ref import require_torch

pytestmark = pytest.mark.parity

SIZE = (48, 64)
CLASSES = [3, 592]
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def pair():
    torch, torchvision = require_torch()
    from scipy.ndimage import gaussian_filter

    from tests.parity.test_cam_parity import _randomize_batchnorm

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(100)
    reference = torchvision.models.resnet18()
    with torch.no_grad():
        _randomize_batchnorm(torch, reference, generator)
    reference = reference.double().eval()
    images = torch.randn((2, 3, *SIZE), generator=generator).float()  # float32 values, see the docstring
    with jax.enable_x64(True):
        model, variables = load_torchvision_resnet(reference.state_dict(), dtype=np.float64)
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables)
    rng = np.random.default_rng(0)
    maps = np.stack([gaussian_filter(rng.random(SIZE), 4) for _ in range(2)])
    maps = (maps - maps.min(axis=(1, 2), keepdims=True)) / np.ptp(maps, axis=(1, 2), keepdims=True)

    class AsFloat64(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.double())

    flax_images = np.asarray(images.numpy().transpose(0, 2, 3, 1), np.float64)
    return torch, AsFloat64(reference), model, variables, images, flax_images, maps


def _targets(kind: str):
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    target = ClassifierOutputTarget if kind == "logit" else ClassifierOutputSoftmaxTarget
    return [target(c) for c in CLASSES]


@pytest.mark.parametrize("score", ["logit", "softmax"])
def test_cam_mult_image_confidence_change(pair, score):
    from pytorch_grad_cam.metrics.cam_mult_image import (
        CamMultImageConfidenceChange,
        DropInConfidence,
        IncreaseInConfidence,
    )

    _torch, reference, model, variables, images, flax_images, maps = pair
    args = (model.apply, variables, flax_images, maps, np.asarray(CLASSES))
    for metric, ours in [
        (CamMultImageConfidenceChange(), evaluation.confidence_change),
        (DropInConfidence(), evaluation.drop_in_confidence),
        (IncreaseInConfidence(), evaluation.increase_in_confidence),
    ]:
        expected = metric(images.double(), maps, _targets(score), reference)
        np.testing.assert_allclose(np.asarray(ours(*args, score=score)), np.ravel(expected), atol=TOLERANCE, rtol=0)


@pytest.fixture
def zero_noise(pair, monkeypatch):
    torch = pair[0]
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)


@pytest.mark.parametrize("percentile", [10, 35, 80])
def test_road_single_percentiles(pair, zero_noise, percentile):
    from pytorch_grad_cam.metrics.road import (
        ROADLeastRelevantFirst,
        ROADMostRelevantFirst,
    )

    _torch, reference, model, variables, images, flax_images, maps = pair
    ours = evaluation.road(
        model.apply, variables, flax_images, maps, np.asarray(CLASSES), percentiles=(percentile,), noise=0.0
    )
    for order, metric in (("morf", ROADMostRelevantFirst(percentile)), ("lerf", ROADLeastRelevantFirst(percentile))):
        expected = np.ravel(metric(images, maps, _targets("logit"), reference))
        np.testing.assert_allclose(np.asarray(ours[order][0]), expected, atol=TOLERANCE, rtol=0)


def test_road_averages_and_combined(pair, zero_noise):
    from pytorch_grad_cam.metrics.road import (
        ROADCombined,
        ROADLeastRelevantFirstAverage,
        ROADMostRelevantFirstAverage,
    )

    _torch, reference, model, variables, images, flax_images, maps = pair
    percentiles = [15, 50, 85]
    targets = _targets("softmax")
    args = (model.apply, variables, flax_images, maps, np.asarray(CLASSES))
    changes = evaluation.road(*args, percentiles=percentiles, noise=0.0, score="softmax")
    morf = np.ravel(ROADMostRelevantFirstAverage(percentiles)(images, maps, targets, reference))
    lerf = np.ravel(ROADLeastRelevantFirstAverage(percentiles)(images, maps, targets, reference))
    combined = np.ravel(ROADCombined(percentiles)(images, maps, targets, reference))
    np.testing.assert_allclose(np.asarray(changes["morf"].mean(0)), morf, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.asarray(changes["lerf"].mean(0)), lerf, atol=TOLERANCE, rtol=0)
    ours_combined = evaluation.road_combined(*args, percentiles=percentiles, noise=0.0, score="softmax")
    np.testing.assert_allclose(np.asarray(ours_combined), combined, atol=TOLERANCE, rtol=0)


class _GivenMaps:
    """A torchcam CAM extractor that returns fixed maps (at the input resolution)."""

    def __init__(self, torch, model, maps):
        self.model, self.maps, self.torch = model, maps, torch

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.torch.from_numpy(self.maps)]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def test_torchcam_classification_metric(pair):
    from torchcam.metrics import ClassificationMetric

    torch, reference, model, variables, images, flax_images, maps = pair
    metric = ClassificationMetric(_GivenMaps(torch, reference, maps), lambda logits: torch.softmax(logits, dim=-1))
    metric.update(images.double())  # each image's top class
    summary = metric.summary()
    top = np.argmax(np.asarray(model.apply(variables, jnp.asarray(flax_images))), axis=1)
    args = (model.apply, variables, flax_images, maps, top)
    drop = np.asarray(evaluation.average_drop(*args, score="softmax"))
    increase = np.asarray(evaluation.increase_in_confidence(*args, score="softmax"))
    np.testing.assert_allclose(drop.mean(), summary["avg_drop"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(increase.mean(), summary["conf_increase"], atol=TOLERANCE, rtol=0)
    assert drop.max() > 0.01  # a real drop was compared, not zeros


@pytest.mark.optimized
@pytest.mark.parametrize("steps, score", [(20, "softmax"), (6, "logit")])
def test_torchcam_deletion_insertion(pair, steps, score):
    from torchcam.metrics import DeletionInsertionMetric

    torch, reference, model, variables, images, flax_images, maps = pair
    logits_fn = (lambda logits: torch.softmax(logits, dim=-1)) if score == "softmax" else None
    curves = evaluation.deletion_insertion(
        model.apply, variables, flax_images, maps, np.asarray(CLASSES), steps=steps, score=score, chunk_size=16
    )
    for b in range(2):  # one image per update, so the summary is that image's areas
        metric = DeletionInsertionMetric(
            _GivenMaps(torch, reference, maps[b : b + 1]), logits_fn, steps=steps, batch_size=8
        )
        metric.update(images[b : b + 1].double(), [CLASSES[b]])
        summary = metric.summary()
        np.testing.assert_allclose(float(curves.deletion_auc[b]), summary["deletion_auc"], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(float(curves.insertion_auc[b]), summary["insertion_auc"], atol=TOLERANCE, rtol=0)


@pytest.mark.optimized
def test_arcc_with_gradcam(pair, zero_noise):
    """pytorch-grad-cam's ARCC with its GradCAM as the base method; flaxcam's with its Grad-CAM. Both sides
    get the same maps (flaxcam's Grad-CAM maps); the re-explained maps of the masked images come from
    each library's own Grad-CAM (in float64 they agree closely: coherency and ARCC differed by 5e-9 and
    4e-8 when this test was written)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.metrics.arcc import ARCC, Coherency, Complexity
    from pytorch_grad_cam.metrics.road import ROADCombined

    _torch, reference, model, variables, images, flax_images, _maps = pair
    explain_fn = evaluation.explainer(model, "gradcam", layer="layer4")
    targets = np.asarray(CLASSES)
    cams = np.asarray(explain_fn(variables, jnp.asarray(flax_images), targets))
    base = GradCAM(reference, target_layers=[reference.inner.layer4])  # float32 input, float64 inside
    ours = evaluation.arcc(
        lambda x, t: explain_fn(variables, x, t), model.apply, variables, flax_images, cams, targets, noise=0.0
    )
    np.testing.assert_allclose(np.asarray(ours["complexity"]), Complexity()(cams), atol=1e-12)
    coherency = Coherency()(images, cams, _targets("logit"), reference, base)
    np.testing.assert_allclose(np.asarray(ours["coherency"]), coherency, atol=TOLERANCE, rtol=0)
    expected = ARCC(base)(images, cams, _targets("logit"), reference)
    np.testing.assert_allclose(np.asarray(ours["arcc"]), np.ravel(expected), atol=TOLERANCE, rtol=0)
    # With random weights ROADCombined is often <= 0, clipped to 0, and ARCC ~ 0: compare its ROAD term too.
    road = ROADCombined(percentiles=[20, 40, 60, 80])(images, cams, _targets("logit"), reference)
    np.testing.assert_allclose(np.asarray(ours["road"]), np.ravel(road), atol=TOLERANCE, rtol=0)
    assert np.ptp(cams) > 0.5 and np.ptp(np.asarray(ours["coherency"])) > 0  # real maps
