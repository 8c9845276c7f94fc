"""The shifted-sum depthwise convolution of EfficientNet-Lite equals XLA's grouped convolution."""

import jax
import numpy as np
import pytest
from jax import lax

from flaxcam.models.efficientnet import depthwise_conv_same


@pytest.mark.parametrize(
    "height, width, channels, kernel_size, stride",
    [(9, 12, 5, 3, 1), (9, 12, 5, 3, 2), (8, 8, 4, 5, 2), (7, 10, 3, 5, 1), (1, 1, 2, 3, 2)],
)
def test_depthwise_conv_same_equals_grouped_convolution(height, width, channels, kernel_size, stride):
    rng = np.random.default_rng(height * 100 + kernel_size * 10 + stride)
    x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, 1, channels)).astype(np.float32)
    expected = lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision=lax.Precision.HIGHEST,
    )
    got = jax.jit(depthwise_conv_same, static_argnums=2)(x, kernel, stride)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
