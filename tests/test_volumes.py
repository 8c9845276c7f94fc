"""3-D inputs without PyTorch: the volume zoom against SciPy, Grad-CAM on a 3-D CNN against a float64
NumPy derivation, the figure, and clear errors for 2-D-only methods and mismatched layers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import flaxcam
from flaxcam import ops
from flaxcam.probe import forward_at_layer, forward_at_layers
from flaxcam.viz import volume_figure
from tests.parity.test_volume_parity import VOLUME, Small3DCNN


@pytest.fixture(scope="module")
def net():
    model = Small3DCNN()
    volumes = jax.random.normal(jax.random.key(1), (2, *VOLUME, 1))
    variables = model.init(jax.random.key(0), volumes)
    variables = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), variables)
    return model, variables, volumes


def test_volume_resize_is_scipy_zoom():
    volume = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    ours = np.asarray(ops.resize_volumes(jnp.asarray(volume), (9, 8, 15)))
    expected = np.stack([ndimage.zoom(v, (9 / 3, 8 / 4, 15 / 5)) for v in volume])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_3d_gradcam_equals_float64_numpy(net):
    model, variables, volumes = net
    ours = flaxcam.explain(model, variables, volumes, method="gradcam", layer="block2", targets=[1, 2])
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), variables)
        x64 = np.asarray(volumes, np.float64)
        _, activations, _ = forward_at_layer(model, v64, x64, "block2")

        def score(delta):
            out, _, _ = forward_at_layers(model, v64, x64, ("block2",), (delta,))
            return out[jnp.arange(2), jnp.asarray([1, 2])].sum()

        gradients = np.asarray(jax.grad(score)(jnp.zeros(activations.shape)))
    a = np.asarray(activations)
    raw = (a * gradients.mean(axis=(1, 2, 3), keepdims=True)).sum(-1)
    np.testing.assert_allclose(np.asarray(ours.raw)[:, 0], raw, rtol=1e-4, atol=1e-5 * np.abs(raw).max())
    assert ours.maps.shape == (2, 1, *VOLUME)
    maps = np.asarray(ours.maps)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_2d_only_methods_and_mismatched_layers_are_refused(net):
    model, variables, volumes = net
    for method in ("gradcam++", "eigencam", "scorecam", "guided_backprop"):
        message = f"method '{re.escape(method)}' explains 2-D images only.*layers: fem, gradcam, hirescam, layercam"
        with pytest.raises(ValueError, match=message):
            flaxcam.explain(
                model, variables, volumes, method=method, layer=None if method == "guided_backprop" else "block2"
            )
    with pytest.raises(ValueError, match="aug_smooth and eigen_smooth are for 2-D images"):
        flaxcam.explain(model, variables, volumes, method="gradcam", layer="block2", aug_smooth=True)


def test_volume_figure_shows_slices(net):
    model, variables, volumes = net
    out = flaxcam.explain(model, variables, volumes, method="fem", layer="block1")
    figure = volume_figure(np.asarray(volumes[0]), np.asarray(out.maps[0, 0]), slices=3)
    assert len(figure.axes) == 6
    with pytest.raises(ValueError, match="same"):
        volume_figure(np.asarray(volumes[0]), np.asarray(out.maps[0, 0])[1:])
