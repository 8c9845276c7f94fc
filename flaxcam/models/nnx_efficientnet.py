"""NNX twin of :mod:`flaxcam.models.efficientnet` (EfficientNet-Lite0, eval mode): the same module
names (``stem``, ``_blocks.<i>``, ``head``, ``_fc``), so linen variables load one to one
(:func:`flaxcam.models.nnx_resnet.load_linen_variables`) and layer names match.

``pretrained_efficientnet_lite0(api="nnx")`` returns this model with the pretrained weights.
Training-only parts (dropout, drop-connect) are left out: the twin is for explaining.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from flaxcam.models.efficientnet import LITE0_BLOCKS, BlockArgs, depthwise_conv_same
from flaxcam.models.nnx_resnet import PointwiseConv, load_linen_variables
from flaxcam.models.resnet import check_pooling, global_pool

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, rngs=rngs)


def _conv(cin: int, cout: int, kernel: int, strides: int, rngs: nnx.Rngs) -> nnx.Module:
    if kernel == 1:
        return PointwiseConv(cin, cout, strides, rngs=rngs)
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(strides, strides), padding="SAME", use_bias=False, rngs=rngs)


class DepthwiseConv(nnx.Module):
    """Depthwise ``k x k`` convolution with "SAME" padding, ``kernel`` ``(k, k, 1, C)``
    (:func:`flaxcam.models.efficientnet.depthwise_conv_same`)."""

    def __init__(self, channels: int, kernel_size: int, strides: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (kernel_size, kernel_size, 1, channels)))
        self.strides = strides

    def __call__(self, x: jax.Array) -> jax.Array:
        return depthwise_conv_same(x, self.kernel[...], self.strides)


class Stem(nnx.Module):
    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self._conv_stem = _conv(3, features, 3, 2, rngs)
        self._bn0 = _batch_norm(features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu6(self._bn0(self._conv_stem(x)))


class Head(nnx.Module):
    def __init__(self, cin: int, features: int, *, rngs: nnx.Rngs):
        self._conv_head = _conv(cin, features, 1, 1, rngs)
        self._bn1 = _batch_norm(features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu6(self._bn1(self._conv_head(x)))


class MBConvBlock(nnx.Module):
    """Inverted residual block without squeeze-and-excitation (eval mode)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, expand_ratio: int, *, rngs: nnx.Rngs):
        hidden = cin * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = _conv(cin, hidden, 1, 1, rngs)
            self._bn0 = _batch_norm(hidden, rngs)
        self.expand = expand_ratio != 1
        self._depthwise_conv = DepthwiseConv(hidden, kernel_size, stride, rngs=rngs)
        self._bn1 = _batch_norm(hidden, rngs)
        self._project_conv = _conv(hidden, cout, 1, 1, rngs)
        self._bn2 = _batch_norm(cout, rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = nnx.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = nnx.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite (NNX, eval mode): ``model(x)`` maps NHWC images to logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        pooling: str = "avg",
        blocks_args: tuple[BlockArgs, ...] = LITE0_BLOCKS,
        stem_features: int = 32,
        head_features: int = 1280,
        *,
        rngs: nnx.Rngs,
    ):
        self.pooling = check_pooling(pooling)
        self.stem = Stem(stem_features, rngs=rngs)
        blocks = []
        for args in blocks_args:
            for repeat in range(args.num_repeat):
                cin = args.input_filters if repeat == 0 else args.output_filters
                stride = args.stride if repeat == 0 else 1
                blocks.append(
                    MBConvBlock(cin, args.output_filters, args.kernel_size, stride, args.expand_ratio, rngs=rngs)
                )
        self._blocks = nnx.List(blocks)
        self.head = Head(blocks_args[-1].output_filters, head_features, rngs=rngs)
        self._fc = nnx.Linear(head_features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self._fc(global_pool(self.head(x), self.pooling))


def efficientnet_lite0_nnx(
    variables: Mapping[str, Any] | None = None, num_classes: int = 1000, pooling: str = "avg", seed: int = 0
) -> EfficientNetLite:
    """EfficientNet-Lite0 (NNX, eval mode), with ``variables`` of the linen
    :func:`flaxcam.models.efficientnet_lite0` loaded when given."""
    model = EfficientNetLite(num_classes, pooling, rngs=nnx.Rngs(seed))
    if variables is not None:
        load_linen_variables(model, variables)
    model.eval()
    return model
