"""The matrix-product 1x1 convolution used by ResNet and EfficientNet equals XLA's and flax's convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flaxcam.models.layers import PointwiseConv, pointwise_conv


@pytest.mark.parametrize(
    "height, width, channels, features, stride, padding",
    [
        (9, 12, 5, 7, 1, "VALID"),
        (9, 12, 5, 7, 2, "VALID"),
        (8, 8, 4, 3, 2, "SAME"),
        (7, 11, 6, 2, 2, "SAME"),
        (1, 1, 2, 3, 2, "SAME"),
    ],
)
def test_pointwise_conv_equals_convolution(height, width, channels, features, stride, padding):
    rng = np.random.default_rng(height * 100 + channels * 10 + stride)
    x = rng.standard_normal((2, height, width, channels)).astype(np.float64)
    kernel = rng.standard_normal((1, 1, channels, features)).astype(np.float64)
    # float64 NumPy reference: strided sampling, then a channel contraction.
    expected = np.einsum("bhwc,cd->bhwd", x[:, ::stride, ::stride], kernel[0, 0])
    xla = lax.conv_general_dilated(
        x.astype(np.float32),
        kernel.astype(np.float32),
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    got = jax.jit(pointwise_conv, static_argnums=2)(x.astype(np.float32), kernel.astype(np.float32), stride)
    assert got.shape == expected.shape == xla.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(xla), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_module_has_nn_conv_parameters_and_output(use_bias):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5, 4)), jnp.float32)
    ours = PointwiseConv(3, strides=2, use_bias=use_bias)
    reference = nn.Conv(3, (1, 1), strides=(2, 2), padding="VALID", use_bias=use_bias)
    variables = ours.init(jax.random.key(0), x)
    reference_variables = reference.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference_variables)
    params = jax.tree.map(lambda v: v + 0.5, variables)  # a non-zero bias too
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=1e-5, rtol=1e-5)


def test_pointwise_conv_rejects_bad_shapes():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(1, 1, C, D\) kernel"):
        pointwise_conv(x, jnp.zeros((3, 3, 3, 2)))
    with pytest.raises(ValueError, match="3 channels, the kernel expects 5"):
        pointwise_conv(x, jnp.zeros((1, 1, 5, 2)))


def test_pointwise_conv_bfloat16_close_to_float32():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 8)), jnp.float32)
    module = PointwiseConv(4, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    out = module.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    full = PointwiseConv(4).apply(variables, x)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(full), atol=0.05, rtol=0.05)
