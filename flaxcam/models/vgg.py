"""VGG16 with a global-pooling head (Flax linen, NHWC), the classic CAM architecture.

The 13 3x3 convolutions are named like Keras' ``VGG16``: ``block1_conv1``, ``block1_conv2``,
``block2_conv1``, ..., ``block5_conv3``. A 2x2 max-pool follows blocks 1 to 4 only, so the output of
``block5_conv3`` (after its ReLU) is the last spatial feature map; it is globally pooled (a plain
function, not a module) and classified by the Dense ``fc``. This is the "GAP network" of the original
CAM paper (Zhou et al., 2016): the CAM of class ``c`` is ``sum_k fc.kernel[k, c] * block5_conv3[..., k]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcam.models.resnet import check_pooling, global_pool

Dtype = Any

#: Output channels of each convolution, per block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG(nn.Module):
    """A VGG feature extractor with a global-pooling classifier.

    Attributes:
        blocks: output channels of each 3x3 conv, per block (``VGG16_BLOCKS`` for VGG16).
        num_classes: width of the ``fc`` classifier.
        pooling: global pooling before ``fc``, ``"avg"`` (GAP) or ``"max"`` (GMP).
        dtype: computation dtype (parameters stay float32).
    """

    blocks: tuple[tuple[int, ...], ...] = VGG16_BLOCKS
    num_classes: int = 1000
    pooling: str = "avg"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        """Validate ``pooling`` as soon as the model is constructed."""
        check_pooling(self.pooling)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Return the logits ``(N, num_classes)`` of NHWC images ``x`` (``train`` is unused: no BatchNorm)."""
        del train
        x = jnp.asarray(x, self.dtype)
        for b, convs in enumerate(self.blocks, start=1):
            if b > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for c, features in enumerate(convs, start=1):
                conv = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"block{b}_conv{c}")
                x = nn.relu(conv(x))
        x = global_pool(x, self.pooling)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def vgg16(num_classes: int = 1000, pooling: str = "avg", dtype: Dtype = jnp.float32) -> VGG:
    """VGG16's 13 convolutions (Keras names, ``block5_conv3`` last) + global pooling + Dense ``fc``."""
    return VGG(blocks=VGG16_BLOCKS, num_classes=num_classes, pooling=pooling, dtype=dtype)
