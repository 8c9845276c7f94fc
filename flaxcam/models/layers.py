"""Layers shared by flaxcam's models, written for XLA's CPU backend as well as for accelerators.

:class:`PointwiseConv` is a 1x1 convolution computed as a matrix product. XLA's CPU backend runs
``lax.conv_general_dilated`` with a 1x1 kernel through its generic convolution path, which on a 2-core
CPU was 1.1-2.7x slower than the same contraction written as a ``dot`` (batch 16, ResNet-50's and
EfficientNet-Lite0's 1x1 shapes; ``python -m benchmarks.pointwise_conv``). ResNet-50 spends most of its FLOPs in 1x1
convolutions and EfficientNet-Lite in its expand/project convolutions, so both use it. On GPU and TPU
both forms lower to the same matrix-multiply kernels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    r"""A 1x1 convolution without padding: :math:`y[b, i, j, d] = \sum_c x[b, s i, s j, c] \, K[0, 0, c, d]`.

    Equal (up to float rounding, tested) to ``lax.conv_general_dilated(x, kernel, (s, s), "VALID")``
    and to torch's ``Conv2d(kernel_size=1, stride=s, padding=0)``; TensorFlow's "SAME" padding is
    zero for a 1x1 kernel at every stride, so it matches that too. ``x`` is ``(B, H, W, C)`` (NHWC),
    ``kernel`` ``(1, 1, C, D)`` (HWIO); the output is ``(B, ceil(H / s), ceil(W / s), D)``.
    """
    if kernel.ndim != 4 or kernel.shape[:2] != (1, 1):
        raise ValueError(f"pointwise_conv needs a (1, 1, C, D) kernel, got shape {tuple(kernel.shape)}")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"pointwise_conv: input has {x.shape[-1]} channels, the kernel expects {kernel.shape[2]}")
    if stride != 1:
        x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, stride, stride, 1))
    return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])


class PointwiseConv(nn.Module):
    """A 1x1 convolution (no padding) with ``nn.Conv``'s parameters — ``kernel`` ``(1, 1, C, D)`` and,
    with ``use_bias``, ``bias`` ``(D,)`` — computed by :func:`pointwise_conv`, so checkpoints and weight
    converters written for ``nn.Conv`` load unchanged.

    Attributes:
        features: output channels ``D``.
        strides: spatial stride (the same in both dimensions).
        use_bias: add a learned bias.
        dtype: computation dtype (parameters stay float32).
        kernel_init: initializer of ``kernel``.
    """

    features: int
    strides: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the 1x1 convolution to NHWC ``x``."""
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        y = pointwise_conv(jnp.asarray(x, self.dtype), kernel.astype(self.dtype), self.strides)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)
        return y
