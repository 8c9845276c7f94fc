"""A small BatchNorm-free CNN for tests and demos (fast on CPU at 64x64..128x128 inputs).

Layout: ``conv1`` (3x3 + ReLU), 2x2 max-pool, ``conv2`` (3x3 + ReLU), 2x2 max-pool, ..., the last conv's
output globally pooled (a plain function, not a module), then the Dense ``fc``. The last conv
(``conv{len(features)}``, ``conv3`` by default) is the natural CAM target layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcam.models.resnet import check_pooling, global_pool

Dtype = Any


class SmallCNN(nn.Module):
    """``conv1`` .. ``convK`` (3x3 + ReLU, 2x2 max-pool between), global pooling, Dense ``fc``.

    Attributes:
        features: output channels of each conv; its length is the number of convs.
        num_classes: width of the ``fc`` classifier.
        pooling: global pooling before ``fc``, ``"avg"`` (GAP) or ``"max"`` (GMP).
        dtype: computation dtype (parameters stay float32).
    """

    features: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    pooling: str = "avg"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        """Validate ``pooling`` and ``features`` as soon as the model is constructed."""
        check_pooling(self.pooling)
        if len(self.features) == 0:
            raise ValueError("SmallCNN needs at least one conv: features must not be empty")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Return the logits ``(N, num_classes)`` of NHWC images ``x`` (``train`` is unused: no BatchNorm)."""
        del train
        x = jnp.asarray(x, self.dtype)
        for i, features in enumerate(self.features, start=1):
            if i > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{i}")(x))
        x = global_pool(x, self.pooling)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def small_cnn(
    num_classes: int = 10,
    features: Sequence[int] = (16, 32, 64),
    pooling: str = "avg",
    dtype: Dtype = jnp.float32,
) -> SmallCNN:
    """A small CNN: ``conv1``..``convK`` with ``features`` channels, global pooling, Dense ``fc``."""
    return SmallCNN(features=tuple(int(f) for f in features), num_classes=num_classes, pooling=pooling, dtype=dtype)
