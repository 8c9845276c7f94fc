"""Deep Feature Factorization: the NMF updates against a float64 NumPy transcription of scikit-learn's
coordinate-descent loop, the objective's descent, bad input and the concept figure."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.dff import deep_feature_factorization
from flaxcam.methods.dff import nmf, nmf_initialization, nmf_objective, nmf_update
from flaxcam.viz import factorization_figure, factorization_overlay
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


def _numpy_coordinate_descent(X, W, Ht):
    """scikit-learn's ``_update_cdnmf_fast``, element by element in float64 (W updated in place)."""
    HHt, XHt = Ht.T @ Ht, X @ Ht
    violation = 0.0
    for t in range(W.shape[1]):
        for i in range(W.shape[0]):
            grad = -XHt[i, t] + HHt[t] @ W[i]
            violation += abs(min(0.0, grad) if W[i, t] == 0 else grad)
            if HHt[t, t] != 0:
                W[i, t] = max(W[i, t] - grad / HHt[t, t], 0.0)
    return violation


def test_nmf_updates_equal_the_float64_numpy_transcription_and_descend():
    rng = np.random.default_rng(0)
    matrix = np.abs(rng.standard_normal((12, 30))) * (rng.random((12, 30)) > 0.3)
    with jax.enable_x64(True):
        basis, coefficients = (np.asarray(f, np.float64) for f in nmf_initialization(jnp.asarray(matrix), 3, seed=0))
        W, Ht = basis.copy(), coefficients.T.copy()
        objectives = [float(nmf_objective(matrix, basis, coefficients))]
        for _ in range(5):
            basis, coefficients, violation = (
                np.asarray(v) for v in nmf_update(jnp.asarray(matrix), jnp.asarray(basis), jnp.asarray(coefficients))
            )
            expected = _numpy_coordinate_descent(matrix, W, Ht) + _numpy_coordinate_descent(matrix.T, Ht, W)
            np.testing.assert_allclose(basis, W, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(coefficients, Ht.T, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(violation, expected, rtol=1e-10)
            objectives.append(float(nmf_objective(matrix, basis, coefficients)))
        assert all(b <= a + 1e-12 for a, b in itertools.pairwise(objectives))
        assert (basis >= 0).all() and (coefficients >= 0).all()
        result = nmf(jnp.asarray(matrix), 3, seed=0)
        assert 5 < int(result.iterations) <= 200
        assert float(result.objective) < objectives[-1]


def test_initialization_is_scikit_learns_random_init():
    matrix = np.abs(np.random.default_rng(1).standard_normal((6, 9))).astype(np.float32)
    basis, coefficients = nmf_initialization(jnp.asarray(matrix), 2, seed=0)
    random = np.random.RandomState(0)
    scale = np.sqrt(matrix.mean() / 2)
    np.testing.assert_allclose(np.asarray(coefficients), np.abs(scale * random.standard_normal((2, 9))), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(basis), np.abs(scale * random.standard_normal((6, 2))), rtol=1e-5)


@pytest.fixture(scope="module")
def net():
    model = UserNet()
    variables, images = _setup(model, (3, 16, 20, 3), seed=4)
    return model, variables, images


def test_factorization_shapes_scores_determinism_and_bad_input(net):
    model, variables, images = net
    first = deep_feature_factorization(model, variables, images, layer="top", n_components=3, head="head")
    again = deep_feature_factorization(model, variables, images, layer="top", n_components=3, head="head")
    np.testing.assert_array_equal(np.asarray(first.heatmaps), np.asarray(again.heatmaps))
    assert first.concepts.shape == (16, 3) and first.heatmaps.shape == (3, 3, 16, 20)
    assert float(first.heatmaps.min()) >= 0 and float(first.heatmaps.max()) <= 1
    kernel, bias = variables["params"]["head"]["kernel"], variables["params"]["head"]["bias"]
    np.testing.assert_allclose(np.asarray(first.scores), np.asarray(first.concepts.T @ kernel + bias), rtol=1e-5)
    with pytest.raises(ValueError, match="n_components must be an int between 1 and min.*16.*got 17"):
        deep_feature_factorization(model, variables, images, layer="top", n_components=17)
    with pytest.raises(ValueError, match="n_components"):
        flaxcam.explain(model, variables, images, method="dff", layer="top", method_options={"n_components": 17})


def test_registered_dff_map_is_one_concept_heatmap_of_the_image_alone(net):
    model, variables, images = net
    batch = flaxcam.explain(model, variables, images, method="dff", layer="top", method_options={"n_components": 3})
    alone = deep_feature_factorization(model, variables, images[1:2], layer="top", n_components=3)
    low = np.asarray(alone.low_res)[0]
    normalized = (low - low.min(axis=(1, 2), keepdims=True)) / (1e-7 + np.ptp(low, axis=(1, 2), keepdims=True))
    errors = np.abs(normalized - np.asarray(batch.low_res)[1, 0]).max(axis=(1, 2))
    assert errors.min() <= 1e-4


def test_factorization_overlay_and_figure(net):
    model, variables, images = net
    concepts = deep_feature_factorization(model, variables, images, layer="top", n_components=3, head="head")
    image = np.uint8(np.random.default_rng(0).integers(0, 255, (16, 20, 3)))
    overlay = factorization_overlay(image, np.asarray(concepts.heatmaps[0]), image_weight=0.0)
    strongest = np.asarray(concepts.heatmaps[0]).max(axis=0)
    # with no image, brightness (the largest RGB component) is the strongest concept's heatmap value
    np.testing.assert_allclose(overlay.max(axis=-1) / 255.0, strongest, atol=1 / 255 + 1e-6)
    figure = factorization_figure(image, concepts, labels=[f"class {i}" for i in range(6)])
    assert len(figure.axes) == 5
