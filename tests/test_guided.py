"""Guided ReLUs by re-interpreting the traced program: checked against a float64 NumPy derivation of
guided backpropagation through a two-layer network, and its documented limits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.methods.guided import guided_relus


def _numpy_guided_gradient(x, w1, w2, v):
    """d/dx of v . relu(W2 relu(W1 x)) with each ReLU's backward masked by [input > 0][gradient > 0]."""
    h1 = w1 @ x
    h2 = w2 @ np.maximum(h1, 0)
    g = v * (h2 > 0) * (v > 0)
    g = w2.T @ g
    g = g * (h1 > 0) * (g > 0)
    return w1.T @ g


def test_guided_gradient_of_an_mlp_equals_the_numpy_derivation():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 8)), rng.standard_normal((12, 16))
    v = rng.standard_normal(12)

    def score(x, w1, w2):  # three spellings of a ReLU, one inside a jit
        hidden = jax.jit(jax.nn.relu)(w1 @ x)
        return v @ jnp.maximum(0.0, w2 @ hidden)

    with jax.enable_x64(True):
        for seed in range(3):
            x = np.random.default_rng(seed).standard_normal(8)
            ours = np.asarray(jax.grad(guided_relus(score))(x, w1, w2))
            np.testing.assert_allclose(ours, _numpy_guided_gradient(x, w1, w2, v), rtol=1e-10, atol=1e-12)
            plain = np.asarray(jax.grad(score)(x, w1, w2))
            assert np.abs(ours - plain).max() > 1e-3  # the rewrite changes the gradient
            assert guided_relus(score)(x, w1, w2) == score(x, w1, w2)  # and not the forward value


def test_other_activations_keep_their_derivative():
    """ReLU6, leaky ReLU, GELU and a maximum with a zero array are not rewritten (documented limits)."""
    x = jnp.linspace(-2.0, 8.0, 11)
    for fn in (jax.nn.relu6, jax.nn.leaky_relu, jax.nn.gelu, lambda y: jnp.maximum(y, jnp.zeros_like(y))):
        score = lambda y, fn=fn: jnp.sum(-fn(y))  # negative incoming gradients: a guided ReLU would zero them
        np.testing.assert_array_equal(np.asarray(jax.grad(guided_relus(score))(x)), np.asarray(jax.grad(score)(x)))
    relu_score = lambda y: jnp.sum(-jax.nn.relu(y))
    assert float(jnp.abs(jax.grad(guided_relus(relu_score))(x)).max()) == 0.0
