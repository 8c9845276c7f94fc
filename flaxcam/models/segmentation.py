"""A small fully convolutional segmentation model: an FCN head on the flaxcam ResNet.

``FCN`` = ``backbone`` (ResNet stem + ``layer1`` .. ``layer4`` with torchvision's module names, no
pooling, no ``fc``) → ``classifier`` (1x1 conv to ``num_classes`` channels) → bilinear upsampling of
the logits to the input's ``(H, W)``. ``model.apply(variables, x)`` returns per-pixel logits
``(B, H, W, num_classes)``: explain it with :class:`flaxcam.targets.Segmentation` (the sum of a class's
logits over a mask), e.g. with GradCAMElementWise at ``layer="backbone"`` (the ``layer4`` output) or
``"backbone.layer3"``.

Reference: Long, Shelhamer, Darrell. "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015
(the single-scale FCN-32s head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcam.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNetStage,
    _batch_norm,
    _conv,
)

Dtype = Any


class ResNetFeatures(nn.Module):
    """The ResNet trunk: stem (``conv1``, ``bn1``, ReLU, 3x3/2 max-pool) and stages ``layer1`` ..
    ``layerN``; returns the last stage's ``(B, H/32, W/32, C)`` features."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """NHWC images → the last stage's feature map."""
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(_conv(64, 7, 2, 3, self.dtype, "conv1")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            x = ResNetStage(
                self.block_cls,
                num_blocks,
                64 * 2**i,
                strides=1 if i == 0 else 2,
                dtype=self.dtype,
                name=f"layer{i + 1}",
            )(x, train)
        return x


class FCN(nn.Module):
    """FCN-32s-style segmentation model on a ResNet trunk.

    Attributes:
        stage_sizes, block_cls: the trunk (``(2, 2, 2, 2)``, :class:`BasicBlock` for ResNet-18).
        num_classes: output channels of the 1x1 ``classifier`` (segmentation classes).
        dtype: computation dtype.

    Submodules (layer names for :func:`flaxcam.explain`): ``backbone`` (and ``backbone.layer1`` ..
    ``backbone.layer4``, ``backbone.layer3.1.conv2``, ...), ``classifier``.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock
    num_classes: int = 21
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.backbone = ResNetFeatures(tuple(self.stage_sizes), self.block_cls, self.dtype)
        self.classifier = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)

    def head(self, features: jax.Array, size: tuple[int, int]) -> jax.Array:
        """Backbone features → per-pixel logits ``(B, *size, num_classes)`` (1x1 conv, bilinear upsampling
        with half-pixel centres)."""
        logits = self.classifier(features)
        return jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear")

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Per-pixel logits ``(B, H, W, num_classes)`` of NHWC images ``x``."""
        return self.head(self.backbone(x, train), cast(tuple[int, int], x.shape[1:3]))


def fcn_resnet18(num_classes: int = 21, dtype: Dtype = jnp.float32) -> FCN:
    """FCN head on a ResNet-18 trunk: per-pixel logits ``(B, H, W, num_classes)``."""
    return FCN((2, 2, 2, 2), BasicBlock, num_classes, dtype)


def fcn_resnet50(num_classes: int = 21, dtype: Dtype = jnp.float32) -> FCN:
    """FCN head on a ResNet-50 trunk: per-pixel logits ``(B, H, W, num_classes)``."""
    return FCN((3, 4, 6, 3), Bottleneck, num_classes, dtype)
