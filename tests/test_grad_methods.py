"""Exact Grad-CAM++, ShapleyCAM, FullGrad and FinerCAM against independent references (no PyTorch):
float64 finite differences, mathematical identities and float64 NumPy derivations.

(FullGrad, ShapleyCAM and FinerCAM are also compared with pytorch-grad-cam in
tests/parity/test_grad_methods_parity.py.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.methods import finer_target_scores, gradcam_plusplus
from flaxcam.ops import minmax_normalize
from flaxcam.probe import (
    bias_layers,
    derivative_diagonals,
    effective_bias,
    input_and_layer_gradients,
    probe,
    probe_hessian,
)
from flaxcam.targets import TargetSpec, target_scores
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


class SmoothNet(nn.Module):
    """Smooth activations (GELU, softplus, tanh) after the explained layer ``mid``, so that the second
    and third derivatives of a logit w.r.t. ``mid``'s output are not zero."""

    def setup(self):
        self.stem = nn.Conv(6, (3, 3))
        self.mid = nn.Conv(5, (3, 3), strides=2)
        self.top = nn.Conv(4, (3, 3))
        self.head = nn.Dense(3)

    def first_half(self, x):
        return self.mid(nn.gelu(self.stem(x)))

    def second_half(self, a):
        h = jnp.tanh(self.top(nn.softplus(a)))
        return self.head(nn.gelu(h).mean((1, 2)))

    def __call__(self, x):
        return self.second_half(self.first_half(x))


TARGETS = np.array([[0, 2], [1, 0]])  # two targets per image, different per image


def _smooth_net_float64():
    """SmoothNet, its variables and 2 images in float64 (call inside ``jax.enable_x64(True)``)."""
    model = SmoothNet()
    variables, images = _setup(model, (2, 8, 10, 3), seed=3)
    to64 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)
    return model, to64(variables), to64(images)


def _tail_scores(model, variables, activations: np.ndarray) -> np.ndarray:
    """(n, B, h, w, C) perturbed activations → (n, B, T) target logits, by the model's second half."""
    logits = _second_half_batched(variables, jnp.asarray(activations))
    return np.take_along_axis(np.asarray(logits), TARGETS[None], axis=2)


@jax.jit
def _second_half_batched(variables, activations):
    return jax.vmap(lambda a: SmoothNet().apply(variables, a, method=SmoothNet.second_half))(activations)


def _finite_difference_derivatives(model, variables, activations: np.ndarray, step: float = 2e-3):
    """First, second and third derivatives of every target score along each element of the
    activations (the same element in every image: images are independent), by central differences
    in float64. Returns three (B, T, h, w, C) arrays."""
    batch, *element_shape = activations.shape
    size = int(np.prod(element_shape))
    units = np.eye(size).reshape(size, 1, *element_shape)
    at = lambda k: _tail_scores(model, variables, activations[None] + k * step * units)  # (size, B, T)
    f_m2, f_m1, f_0, f_p1, f_p2 = (at(k) for k in (-2, -1, 0, 1, 2))
    first = (f_p1 - f_m1) / (2 * step)
    second = (f_p1 - 2 * f_0 + f_m1) / step**2
    third = (f_p2 - 2 * f_p1 + 2 * f_m1 - f_m2) / (2 * step**3)
    arrange = lambda d: np.moveaxis(d, 0, -1).reshape(batch, TARGETS.shape[1], *element_shape)
    return arrange(first), arrange(second), arrange(third)


def _numpy_gradcam_plusplus_eq19(activations, first, second, third) -> np.ndarray:
    """float64 eq. 19 of Chattopadhyay et al.: (B, T, h, w) raw maps."""
    sums = activations.sum(axis=(1, 2))[:, None, None, None, :]  # (B, 1, 1, 1, C)
    denominator = 2 * second + sums * third
    alpha = np.where(denominator != 0, second / np.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * np.maximum(first, 0)).sum(axis=(2, 3))  # (B, T, C)
    return np.einsum("bhwc,btc->bthw", activations, weights)


def test_exact_gradcam_plusplus_equals_float64_finite_differences():
    with jax.enable_x64(True):
        model, variables, images = _smooth_net_float64()
        activations = np.asarray(model.apply(variables, images, method=SmoothNet.first_half))
        first, second, third = _finite_difference_derivatives(model, variables, activations)
        spec = TargetSpec("classes", 2)
        score_fn = lambda out: target_scores(spec, out, {"classes": jnp.asarray(TARGETS)})
        # 100 elements per image in chunks of 7: the last chunk is padded
        diagonals = jax.jit(lambda v, x: derivative_diagonals(model, v, x, ("mid",), score_fn, chunk_size=7))
        (ours_second,), (ours_third,) = diagonals(variables, images)
        explanation = flaxcam.explain(model, variables, images, method="gradcam++exact", layer="mid", targets=TARGETS)
        raw = np.asarray(explanation.raw)
        default = flaxcam.explain(model, variables, images, method="gradcam++", layer="mid", targets=TARGETS)
    assert raw.dtype == np.float64 and activations.shape == (2, 4, 5, 5)
    # the derivatives are not trivial: both diagonals are far from zero and from the powers of the gradient
    assert np.abs(second).max() > 1e-3 and np.abs(third).max() > 1e-3
    assert np.abs(second - first**2).max() > 0.3 * np.abs(second).max()
    np.testing.assert_allclose(np.asarray(ours_second), second, rtol=1e-5, atol=1e-6 * np.abs(second).max())
    np.testing.assert_allclose(np.asarray(ours_third), third, rtol=1e-4, atol=5e-5 * np.abs(third).max())
    # eq. 19 in float64 NumPy on the diagonals just checked (those from finite differences are only
    # good to ~1e-6, and the map divides by 2∂²Y + ΣA ∂³Y, which can be near zero and amplify that)
    expected = _numpy_gradcam_plusplus_eq19(activations, first, np.asarray(ours_second), np.asarray(ours_third))
    np.testing.assert_allclose(raw, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    from_finite_differences = _numpy_gradcam_plusplus_eq19(activations, first, second, third)
    assert np.abs(raw - from_finite_differences).max() <= 1e-2 * np.abs(from_finite_differences).max()
    # and it is not pytorch-grad-cam's formula on this smooth network
    assert np.abs(np.asarray(default.low_res) - np.asarray(explanation.low_res)).max() > 0.05


def test_exact_gradcam_plusplus_equals_default_for_an_exponential_score():
    """exp(logit) of a ReLU network: the derivatives of Y = exp(S) are Y g^n (g = ∂S/∂A), so eq. 19 is
    the powers-of-the-gradient formula up to the factor Y, which normalization removes. The default
    formula's epsilon (1e-6 in the denominator, next to g²) is the only difference: the maps are equal
    to the formula without it, and to the default itself once the gradients are large (a head ×100).
    The raw logit of a ReLU network has zero second and third derivatives: a zero map."""
    model = UserNet()
    variables, images = _setup(model, (2, 12, 16, 3), seed=4)
    exact = flaxcam.explain(model, variables, images, method="gradcam++exact", layer="mid", top_k=2, output_fn=jnp.exp)
    spec = TargetSpec("top_k", 2)
    _, activations, gradients, _, chosen = jax.jit(
        lambda v, x: probe(model, v, x, "mid", lambda out: target_scores(spec, out, None))
    )(variables, images)
    np.testing.assert_array_equal(np.asarray(exact.targets), np.asarray(chosen))
    without_eps = jax.vmap(jax.vmap(lambda g, a: gradcam_plusplus(a, g, eps=0.0).sum(-1), in_axes=(0, None)))(
        gradients, activations
    )
    np.testing.assert_allclose(
        np.asarray(exact.low_res), np.asarray(minmax_normalize(jax.nn.relu(without_eps))), atol=1e-5
    )
    assert (np.asarray(exact.low_res).reshape(4, -1).std(axis=1) > 0.05).all()

    variables["params"]["head"]["kernel"] = variables["params"]["head"]["kernel"] * 100  # logits up to ~50
    exact = flaxcam.explain(model, variables, images, method="gradcam++exact", layer="top", top_k=2, output_fn=jnp.exp)
    default = flaxcam.explain(model, variables, images, method="gradcam++", layer="top", top_k=2)
    np.testing.assert_array_equal(np.asarray(exact.targets), np.asarray(default.targets))
    np.testing.assert_allclose(np.asarray(exact.low_res), np.asarray(default.low_res), atol=1e-4)
    piecewise_linear = flaxcam.explain(model, variables, images, method="gradcam++exact", layer="top", top_k=2)
    assert np.abs(np.asarray(piecewise_linear.raw)).max() == 0


def test_shapleycam_hessian_vector_product_equals_finite_differences():
    with jax.enable_x64(True):
        model, variables, images = _smooth_net_float64()
        spec = TargetSpec("classes", 2)
        score_fn = lambda out: target_scores(spec, out, {"classes": jnp.asarray(TARGETS)})
        _, (activations,), (gradients,), (hvp,), _, _ = jax.jit(
            lambda v, x: probe_hessian(model, v, x, ("mid",), score_fn)
        )(variables, images)
        activations = np.asarray(activations)

        @jax.jit
        def gradient_at(a):  # (B, T, h, w, C): per-target gradient of the model's second half, no probe
            def score(x, t):
                logits = model.apply(variables, x, method=SmoothNet.second_half)
                return jnp.sum(jnp.take_along_axis(logits, jnp.asarray(TARGETS)[:, t : t + 1], axis=1))

            return jnp.stack([jax.grad(score)(a, t) for t in range(TARGETS.shape[1])], axis=1)

        gradient_at = lambda a, jitted=gradient_at: np.asarray(jitted(jnp.asarray(a)))

        step = 1e-4
        expected_hvp = (gradient_at(activations * (1 + step)) - gradient_at(activations * (1 - step))) / (2 * step)
        np.testing.assert_allclose(np.asarray(gradients), gradient_at(activations), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(hvp), expected_hvp, rtol=1e-5, atol=1e-7 * np.abs(expected_hvp).max())
        assert np.abs(expected_hvp).max() > 0.1 * np.abs(np.asarray(gradients)).max()
        explanation = flaxcam.explain(model, variables, images, method="shapleycam", layer="mid", targets=TARGETS)
        weights = (np.asarray(gradients) - 0.5 * expected_hvp).mean(axis=(2, 3))  # (B, T, C)
        expected = np.einsum("bhwc,btc->bthw", activations, weights)
        np.testing.assert_allclose(np.asarray(explanation.raw), expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())


def test_shapleycam_equals_gradcam_for_a_piecewise_linear_score():
    model = UserNet()
    variables, images = _setup(model, (3, 16, 20, 3), seed=4)
    shapley = flaxcam.explain(model, variables, images, method="shapleycam", layer="mid", top_k=2)
    plain = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", top_k=2)
    np.testing.assert_allclose(np.asarray(shapley.raw), np.asarray(plain.raw), rtol=1e-5, atol=1e-7)


class BiasNet(nn.Module):
    """Convolutions with and without bias, BatchNorm, ReLU, max-pooling, GAP, Dense: piecewise linear."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(
            nn.BatchNorm(use_running_average=True, name="bn1")(nn.Conv(6, (3, 3), use_bias=False, name="conv1")(x))
        )
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
        x = nn.BatchNorm(use_running_average=True, use_scale=False, name="bn2")(x)
        return nn.Dense(4, name="head")(nn.relu(x).mean((1, 2)))


def _bias_net():
    model = BiasNet()
    images = jax.random.normal(jax.random.key(1), (3, 12, 16, 3))
    variables = model.init(jax.random.key(0), images)
    noisy = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(7), p.shape), variables["params"]
    )
    stats = {
        name: {
            "mean": 0.2 * jax.random.normal(jax.random.key(i), (c,)),
            "var": 0.5 + jax.random.uniform(jax.random.key(i + 9), (c,)),
        }
        for i, (name, c) in enumerate((("bn1", 6), ("bn2", 8)))
    }
    return model, {"params": noisy, "batch_stats": stats}, images


def test_fullgrad_gradients_are_complete():
    """The full-gradient decomposition of a piecewise-linear network (Srinivas & Fleuret, eq. 2): the
    target logit equals x·∇x y + Σ_l Σ b_l·∇z_l y, over every bias — the convolutions', the BatchNorms'
    effective ones and the Dense head's (which FullGrad's map leaves out, like pytorch-grad-cam)."""
    model, variables, images = _bias_net()
    layers = bias_layers(model, variables, images)
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("bn1", "BatchNorm"),
        ("conv2", "Conv"),
        ("bn2", "BatchNorm"),
    ]
    spec = TargetSpec("top_k", 2)
    _, scores, chosen, input_gradients, layer_gradients = jax.jit(
        lambda v, x: input_and_layer_gradients(
            model, v, x, tuple(layer.name for layer in layers), lambda out: target_scores(spec, out, None)
        )
    )(variables, images)
    total = np.einsum("bhwc,bthwc->bt", np.asarray(images, np.float64), np.asarray(input_gradients, np.float64))
    for layer, gradient in zip(layers, layer_gradients):
        total += np.einsum(
            "c,bthwc->bt", np.asarray(effective_bias(variables, layer), np.float64), np.asarray(gradient, np.float64)
        )
    total += np.asarray(variables["params"]["head"]["bias"], np.float64)[np.asarray(chosen)]
    np.testing.assert_allclose(total, np.asarray(scores), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(scores)).max())
    # BatchNorm's effective bias by hand (bn1 has a scale, bn2 has none)
    bn1 = variables["batch_stats"]["bn1"]
    expected = variables["params"]["bn1"]["bias"] - bn1["mean"] * variables["params"]["bn1"]["scale"] / np.sqrt(
        bn1["var"] + 1e-5
    )
    np.testing.assert_allclose(np.asarray(effective_bias(variables, layers[0])), np.asarray(expected), rtol=1e-6)


def test_fullgrad_map_and_errors():
    model, variables, images = _bias_net()
    explanation = flaxcam.explain(model, variables, images, method="fullgrad", top_k=2)
    assert explanation.maps.shape == explanation.raw.shape == (3, 2, 12, 16)
    assert np.array_equal(np.asarray(explanation.maps), np.asarray(explanation.low_res))
    maps = np.asarray(explanation.maps)
    assert maps.min() == 0 and np.allclose(maps.max(axis=(2, 3)), 1, atol=1e-5)
    with pytest.raises(ValueError, match="takes no layer="):
        flaxcam.explain(model, variables, images, method="fullgrad", layer="conv2")
    with pytest.raises(ValueError, match="takes no layer="):
        flaxcam.explain(model, variables, images, method="fullgrad", eigen_smooth=True)


def test_finer_target_scores_equal_numpy_derivation():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 10)) * 3
    classes = np.array([[0, 4], [9, 9], [5, 1]])
    ours = np.asarray(finer_target_scores(jnp.asarray(logits, jnp.float32), jnp.asarray(classes)))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for b in range(3):
        for t, c in enumerate(classes[b]):
            order = np.argsort(np.abs(logits[b] - logits[b, c]))
            assert order[0] == c
            nearest = order[1:4]
            weights = probabilities[b, nearest]
            expected = (weights * (logits[b, c] - logits[b, nearest])).sum() / (weights.sum() + 1e-9)
            np.testing.assert_allclose(ours[b, t], expected, rtol=1e-5)


def test_finercam_needs_class_logit_targets():
    model = UserNet()
    variables, images = _setup(model, (2, 16, 20, 3), seed=4)
    with pytest.raises(ValueError, match="needs class targets scored by their logit"):
        flaxcam.explain(model, variables, images, method="finercam", layer="mid", score="softmax")
    explanation = flaxcam.explain(model, variables, images, method="finercam", layer="mid", top_k=2)
    expected = finer_target_scores(explanation.logits, explanation.targets)
    np.testing.assert_allclose(np.asarray(explanation.scores), np.asarray(expected), rtol=1e-6)
