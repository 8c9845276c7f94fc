"""Method-level checks that need no PyTorch: float64 NumPy derivations and invariances.

(Every method is also compared with pytorch-grad-cam on a ResNet-18 in tests/parity/.)
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import flaxcam
from flaxcam.methods import first_component_projection
from flaxcam.methods.score import align_corners_matrix
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


@pytest.fixture(scope="module")
def net():
    model = UserNet()
    variables, images = _setup(model, (3, 16, 20, 3), seed=4)
    return model, variables, images


def test_projection_equals_float64_svd_with_positive_orientation():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal((6, 7, 9)).astype(np.float32)
        ours = np.asarray(first_component_projection(x))
        matrix = x.reshape(42, 9).astype(np.float64)
        centred = matrix - matrix.mean(axis=0)
        _, _, vt = np.linalg.svd(centred)
        expected = (centred @ vt[0]).reshape(6, 7)
        if (expected * matrix.sum(axis=1).reshape(6, 7)).sum() < 0:
            expected = -expected
        np.testing.assert_allclose(ours, expected, atol=1e-4)
        # the orientation rule: positive correlation with the channel sum, whatever the SVD's sign
        assert (ours * x.sum(axis=-1)).sum() >= 0
        np.testing.assert_allclose(np.asarray(first_component_projection(-x)), -ours, atol=1e-4)


def test_align_corners_matrix_matches_definition():
    matrix = align_corners_matrix(5, 3)  # samples at 0, 0.5, 1, 1.5, 2
    expected = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]], np.float32)
    np.testing.assert_allclose(matrix, expected, atol=1e-7)
    assert np.allclose(align_corners_matrix(7, 4).sum(axis=1), 1)


def test_scorecam_equals_numpy_derivation_and_is_chunk_invariant(net):
    model, variables, images = net
    small = flaxcam.explain(model, variables, images, method="scorecam", layer="mid", top_k=2, chunk_size=5)
    large = flaxcam.explain(model, variables, images, method="scorecam", layer="mid", top_k=2, chunk_size=1000)
    np.testing.assert_allclose(np.asarray(small.raw), np.asarray(large.raw), rtol=1e-5, atol=1e-6)

    # float64 re-derivation with the model run on every masked image
    acts = np.asarray(model.apply(variables, images, method=lambda m, x: m.mid(m.stem(x))), np.float64)
    _, h, w, channels = acts.shape
    height, width = images.shape[1:3]
    rows, cols = align_corners_matrix(height, h).astype(np.float64), align_corners_matrix(width, w).astype(np.float64)
    targets = np.asarray(small.targets)
    for b in range(images.shape[0]):
        up = np.einsum("Hh,hwc,Ww->cHW", rows, acts[b], cols)
        low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
        masks = (up - low) / (high - low + 1e-8)
        masked = np.asarray(images[b])[None] * masks[..., None]
        logits = np.asarray(model.apply(variables, masked.astype(np.float32)), np.float64)
        for t, c in enumerate(targets[b]):
            weights = np.exp(logits[:, c] - logits[:, c].max())
            weights /= weights.sum()
            np.testing.assert_allclose(np.asarray(small.raw)[b, t], acts[b] @ weights, rtol=1e-3, atol=1e-5)
    assert channels == 12


def test_randomcam_is_reproducible_from_the_key(net):
    model, variables, images = net
    first = flaxcam.explain(model, variables, images, method="randomcam", layer="mid", key=jax.random.key(1))
    again = flaxcam.explain(model, variables, images, method="randomcam", layer="mid", key=jax.random.key(1))
    other = flaxcam.explain(model, variables, images, method="randomcam", layer="mid", key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(first.raw), np.asarray(again.raw))
    assert np.abs(np.asarray(first.raw) - np.asarray(other.raw)).max() > 1e-3
    legacy = flaxcam.explain(model, variables, images, method="randomcam", layer="mid", key=jax.random.PRNGKey(1))
    assert legacy.raw.shape == first.raw.shape


def test_randomcam_weights_are_uniform_on_minus_one_one():
    from flaxcam.methods import randomcam

    activations = np.ones((1, 1, 4000), np.float32)  # contributions are then the weights themselves
    weights = np.asarray(randomcam(activations, jax.random.key(0))).ravel()
    assert weights.min() >= -1 and weights.max() <= 1
    # uniform(-1, 1): mean 0, variance 1/3; 4000 draws → standard errors 0.009 and 0.004
    assert abs(weights.mean()) < 0.05 and abs(weights.var() - 1 / 3) < 0.03


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigen_methods_are_finite_on_constant_images(net, method):
    model, variables, _ = net
    images = np.zeros((2, 16, 20, 3), np.float32)
    out = flaxcam.explain(model, variables, images, method=method, layer="mid")
    assert np.isfinite(np.asarray(out.maps)).all()


def test_eigen_smooth_changes_the_reduction_only(net):
    model, variables, images = net
    plain = flaxcam.explain(model, variables, images, method="gradcam", layer="mid")
    smooth = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", eigen_smooth=True)
    assert np.abs(np.asarray(plain.low_res) - np.asarray(smooth.low_res)).max() > 0.01
    np.testing.assert_array_equal(np.asarray(plain.targets), np.asarray(smooth.targets))


def test_ablationcam_equals_numpy_derivation(net):
    """Zero each channel of "mid" (post-ReLU, minimum 0) and rerun the rest of the network directly."""
    model, variables, images = net
    out = flaxcam.explain(model, variables, images, method="ablationcam", layer="mid", top_k=2, chunk_size=7)
    acts = np.asarray(model.apply(variables, images, method=lambda m, x: m.mid(m.stem(x))))
    assert (acts.reshape(len(acts), -1).min(axis=1) == 0).all()
    rest = jax.jit(lambda a: model.apply(variables, a, method=lambda m, f: m.classify(m.top(f))))
    original = np.asarray(rest(acts), np.float64)
    targets = np.asarray(out.targets)
    for b in range(len(acts)):
        ablated = np.repeat(acts[b : b + 1], acts.shape[-1], axis=0)
        ablated[np.arange(acts.shape[-1]), :, :, np.arange(acts.shape[-1])] = 0
        scores = np.asarray(rest(ablated), np.float64)
        for t, c in enumerate(targets[b]):
            weights = (original[b, c] - scores[:, c]) / original[b, c]
            np.testing.assert_allclose(
                np.asarray(out.raw)[b, t], acts[b].astype(np.float64) @ weights, rtol=1e-3, atol=1e-5
            )


def test_kernel_pca_projection_equals_scikit_learn():
    from sklearn.decomposition import KernelPCA

    from flaxcam.methods import kernel_pca_projection

    rng = np.random.default_rng(3)
    for _ in range(3):
        x = rng.standard_normal((5, 6, 8)).astype(np.float32)
        ours = np.asarray(kernel_pca_projection(x))
        matrix = x.reshape(30, 8).astype(np.float64)
        centred = matrix - matrix.mean(axis=0)
        expected = KernelPCA(n_components=1, kernel="sigmoid", eigen_solver="dense").fit_transform(centred)[:, 0]
        if (expected * matrix.sum(axis=1)).sum() < 0:
            expected = -expected
        np.testing.assert_allclose(ours.ravel(), expected, atol=1e-4)
        assert (ours.ravel() * matrix.sum(axis=1)).sum() >= 0


def _float64_projection(x: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``get_2d_projection`` in float64 NumPy (SVD of the centred matrix), with
    flaxcam's sign rule: positive correlation with the channel sum."""
    height, width, channels = x.shape
    matrix = np.nan_to_num(x.astype(np.float64)).reshape(height * width, channels)
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[0]
    if (expected * matrix.sum(axis=1)).sum() < 0:
        expected = -expected
    return expected.reshape(height, width)


@pytest.mark.parametrize("shape", [(7, 7, 512), (7, 7, 49), (6, 8, 256), (4, 5, 3), (14, 14, 256)])
def test_gram_projection_equals_float64_svd_for_both_gram_sides(shape):
    """Both branches (h·w × h·w Gram when h·w < C, C × C otherwise) against NumPy's float64 SVD,
    on ReLU-like activations with a dominant spatial mode, as at a CNN's last layer."""
    rng = np.random.default_rng(sum(shape))
    height, width, channels = shape
    mode = rng.standard_normal((height, width, 1)) * rng.uniform(0.5, 2.0, (1, 1, channels))
    x = np.maximum(mode + 0.3 * rng.standard_normal(shape), 0).astype(np.float32)
    expected = _float64_projection(x)
    ours = np.asarray(first_component_projection(x))
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() <= 1e-5 * max(scale, 1.0)


def test_gram_projection_degenerate_inputs_against_float64_svd():
    rng = np.random.default_rng(1)
    # zero map and NaNs only: exactly 0; spatially constant map: 0 after centring, up to the float32
    # rounding of the channel means (the float64 SVD gives 0 too)
    for x in (np.zeros((7, 7, 512)), np.full((4, 5, 3), np.nan)):
        ours = np.asarray(first_component_projection(x.astype(np.float32)))
        assert np.all(np.isfinite(ours)) and np.abs(ours).max() == 0.0
    for channels in (512, 3):
        x = (np.ones((7, 7, channels)) * rng.standard_normal(channels)).astype(np.float32)
        ours = np.asarray(first_component_projection(x))
        assert np.all(np.isfinite(ours)) and np.abs(ours).max() <= 1e-5
        assert np.abs(_float64_projection(x)).max() <= 1e-5
    # rank 1 (after centring): X = a bᵀ, both Gram sides
    for channels in (512, 3):
        a, b = rng.standard_normal((7, 7, 1)), rng.standard_normal((1, 1, channels))
        x = (a * b + rng.standard_normal((1, 1, channels))).astype(np.float32)
        np.testing.assert_allclose(np.asarray(first_component_projection(x)), _float64_projection(x), atol=1e-4)
    # repeated top singular value: the component is not unique, but the map must be finite, have
    # norm σ₁ and lie in the top singular subspace (span of u₁, u₂), like any SVD's answer
    for channels in (512, 3):
        q, _ = np.linalg.qr(rng.standard_normal((49, 3)))
        q = q - q.mean(axis=0)  # centred columns keep the decomposition after centring
        q, _ = np.linalg.qr(q)
        w, _ = np.linalg.qr(rng.standard_normal((channels, 3)))
        matrix = q @ np.diag([3.0, 3.0, 1.0]) @ w.T
        x = matrix.reshape(7, 7, channels).astype(np.float32)
        ours = np.asarray(first_component_projection(x)).reshape(-1).astype(np.float64)
        assert np.all(np.isfinite(ours))
        assert abs(np.linalg.norm(ours) - 3.0) <= 1e-4
        outside = ours - q[:, :2] @ (q[:, :2].T @ ours)
        assert np.linalg.norm(outside) <= 1e-4
    # NaNs are zeros (as in get_2d_projection)
    x = rng.standard_normal((6, 7, 9)).astype(np.float32)
    x[0, 0, 0] = np.nan
    np.testing.assert_allclose(np.asarray(first_component_projection(x)), _float64_projection(x), atol=1e-4)


def test_gram_projection_under_jit_and_vmap():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((3, 7, 7, 64)), 0).astype(np.float32)
    batched = np.asarray(jax.jit(jax.vmap(first_component_projection))(x))
    for i in range(3):
        np.testing.assert_allclose(batched[i], _float64_projection(x[i]), atol=1e-4)
