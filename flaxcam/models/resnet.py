"""ResNet-18/34/50 with torchvision's exact structure (Flax linen, NHWC).

The module tree mirrors ``torchvision.models.resnet`` one to one, so a flax module path joined with
``"."`` is the prefix of the matching torchvision ``state_dict`` key::

    conv1, bn1                                   stem (7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool)
    layer1 .. layer4                             stages; their blocks are submodules "0", "1", ...
    layerN.i.conv1 / bn1 / conv2 / bn2           BasicBlock (ResNet-18/34)
    layerN.i.conv1 / bn1 / ... / conv3 / bn3     Bottleneck (ResNet-50, torchvision v1.5: stride on conv2)
    layerN.i.downsample.0 / downsample.1         1x1 projection conv + BatchNorm of a block's shortcut
    fc                                           the classifier

Global pooling is a plain function (not a module), so the output of ``layer4`` is the last spatial
feature map: the usual CAM target layer. Valid target-layer names are e.g. ``layer4``, ``layer3``,
``layer3.1`` or ``layer3.1.conv2``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcam.models.layers import PointwiseConv

#: Global pooling heads accepted by every model of :mod:`flaxcam.models`.
POOLINGS: tuple[str, ...] = ("avg", "max")

#: torchvision initializes convolutions with ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Dtype = Any


def check_pooling(pooling: str) -> str:
    """Return ``pooling`` if it names a supported global pooling, else raise a ``ValueError``."""
    if pooling not in POOLINGS:
        raise ValueError(
            f"unknown pooling {pooling!r}: valid options are 'avg' (global average pooling, GAP) "
            "and 'max' (global max pooling, GMP)"
        )
    return pooling


def global_pool(x: jax.Array, pooling: str) -> jax.Array:
    """Global pooling over the spatial axes of an NHWC array: ``(N, H, W, C) -> (N, C)``.

    ``"avg"`` is ``jnp.mean(x, axis=(1, 2))`` (GAP), ``"max"`` is ``jnp.max(x, axis=(1, 2))`` (GMP).
    """
    check_pooling(pooling)
    if pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
    return jnp.max(x, axis=(1, 2))


def _batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
    # torch's momentum 0.1 updates ``running = 0.9 * running + 0.1 * batch``: flax momentum 0.9.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def _conv(
    features: int, kernel: int, strides: int, padding: int, dtype: Dtype, name: str, dilation: int = 1
) -> nn.Module:
    if kernel == 1 and padding == 0:
        # 1x1 convs as matrix products: same parameters, faster on XLA's CPU backend (flaxcam.models.layers).
        return PointwiseConv(features, strides=strides, dtype=dtype, kernel_init=_CONV_INIT, name=name)
    # Explicit symmetric padding: flax's "SAME" pads stride-2 convs asymmetrically, torch does not.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        dtype=dtype,
        kernel_init=_CONV_INIT,
        name=name,
    )


class Downsample(nn.Module):
    """A block's projection shortcut: child ``"0"`` (1x1 strided conv, no bias), child ``"1"`` (BatchNorm)."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Project ``x`` to ``features`` channels at the block's stride."""
        x = _conv(self.features, 1, self.strides, 0, self.dtype, "0")(x)
        return _batch_norm(train, self.dtype, "1")(x)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs (``conv1``/``bn1``, ``conv2``/``bn2``) and a shortcut."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    #: Dilation of ``conv1`` and of ``conv2`` (2 in an atrous stage: ``conv1`` keeps 1 in the stage's first block).
    first_dilation: int = 1
    dilation: int = 1

    #: Output channels are ``features * expansion``.
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        out_features = self.features * self.expansion
        identity = x
        y = _conv(self.features, 3, self.strides, self.first_dilation, self.dtype, "conv1", self.first_dilation)(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dilation, self.dtype, "conv2", self.dilation)(y)
        y = _batch_norm(train, self.dtype, "bn2")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            identity = Downsample(out_features, self.strides, self.dtype, name="downsample")(x, train)
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5, stride on the 3x3 ``conv2``): 1x1, 3x3, 1x1 convs and a shortcut."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    #: Dilation of ``conv2`` (2 in an atrous stage, 1 in its first block); ``dilation`` is unused (1x1 convs).
    first_dilation: int = 1
    dilation: int = 1

    #: Output channels are ``features * expansion``.
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        out_features = self.features * self.expansion
        identity = x
        y = _conv(self.features, 1, 1, 0, self.dtype, "conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, self.strides, self.first_dilation, self.dtype, "conv2", self.first_dilation)(y)
        y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
        y = _conv(out_features, 1, 1, 0, self.dtype, "conv3")(y)
        y = _batch_norm(train, self.dtype, "bn3")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            identity = Downsample(out_features, self.strides, self.dtype, name="downsample")(x, train)
        return nn.relu(y + identity)


class ResNetStage(nn.Module):
    """One stage (``layer1`` .. ``layer4``): ``num_blocks`` blocks named ``"0"``, ``"1"``, ...

    The first block carries the stage's stride (and a ``downsample`` shortcut where needed).
    ``atrous=True``: the stride becomes 1 and every 3x3 conv after it is dilated by 2 (same parameters).
    """

    block_cls: type[nn.Module]
    num_blocks: int
    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    atrous: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the stage's blocks in order."""
        dilation = 2 if self.atrous else 1
        for i in range(self.num_blocks):
            strides = 1 if self.atrous or i > 0 else self.strides
            first = 1 if i == 0 else dilation
            x = self.block_cls(self.features, strides, self.dtype, first, dilation, name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """A torchvision-structured ResNet; ``__call__(x, train=False)`` maps NHWC images to logits.

    Attributes:
        stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
        num_classes: width of the ``fc`` classifier.
        pooling: global pooling before ``fc``, ``"avg"`` (GAP) or ``"max"`` (GMP).
        dtype: computation dtype (parameters stay float32).
        atrous: run ``layer4`` at stride 1 with its 3x3 convs after the stride dilated by 2 (same
            parameters; torchvision's ``replace_stride_with_dilation=[False, False, True]``, except that a
            ``BasicBlock``'s ``conv2`` is dilated too): output stride 16, 14x14 maps at 224x224. The à trous
            identity holds: the atrous ``layer4`` output at even rows and columns, ``[:, ::2, ::2]``,
            equals the standard model's (symmetric padding centres a stride-2 output on input ``2i``).
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int = 1000
    pooling: str = "avg"
    dtype: Dtype = jnp.float32
    atrous: bool = False

    def __post_init__(self) -> None:
        """Validate ``pooling`` as soon as the model is constructed."""
        check_pooling(self.pooling)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Return the logits ``(N, num_classes)`` of NHWC images ``x``.

        ``train=True`` normalizes with batch statistics and updates ``batch_stats`` (pass
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages (eval mode).
        """
        x = jnp.asarray(x, self.dtype)
        x = _conv(64, 7, 2, 3, self.dtype, "conv1")(x)
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
        # reduce_window pads with the init value -inf, like torch's MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            x = ResNetStage(
                self.block_cls,
                num_blocks,
                64 * 2**i,
                strides=1 if i == 0 else 2,
                dtype=self.dtype,
                atrous=self.atrous and i == len(self.stage_sizes) - 1,
                name=f"layer{i + 1}",
            )(x, train)
        x = global_pool(x, self.pooling)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)


def resnet18(num_classes: int = 1000, pooling: str = "avg", dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-18 (torchvision structure): BasicBlocks ``(2, 2, 2, 2)``."""
    return ResNet18(num_classes=num_classes, pooling=pooling, dtype=dtype)


def resnet34(num_classes: int = 1000, pooling: str = "avg", dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-34 (torchvision structure): BasicBlocks ``(3, 4, 6, 3)``."""
    return ResNet34(num_classes=num_classes, pooling=pooling, dtype=dtype)


def resnet50(num_classes: int = 1000, pooling: str = "avg", dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-50 (torchvision structure, v1.5): Bottlenecks ``(3, 4, 6, 3)``."""
    return ResNet50(num_classes=num_classes, pooling=pooling, dtype=dtype)
