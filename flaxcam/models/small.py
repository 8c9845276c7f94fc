"""A small BatchNorm-free CNN for tests and demos (fast on CPU at 64x64..128x128 inputs).

Layout: ``conv1`` (3x3 + ReLU), 2x2 max-pool, ``conv2`` (3x3 + ReLU), 2x2 max-pool, ..., the last conv's
output globally pooled (a plain function, not a module), then the Dense ``fc``. The last conv
(``conv{len(features)}``, ``conv3`` by default) is the natural CAM target layer. ``downsamplings`` limits
the number of 2x2 max-pools (the first convs get them), for a finer last feature map: with
``features=(16, 32, 64, 128)`` and ``downsamplings=2`` a 64x64 input gives a 16x16 map instead of 8x8.
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
        downsamplings: number of 2x2 max-pools, in ``0 .. len(features) - 1``; ``None`` (default): one
            before every conv but the first.
        dtype: computation dtype (parameters stay float32).
    """

    features: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    pooling: str = "avg"
    dtype: Dtype = jnp.float32
    downsamplings: int | None = None

    def __post_init__(self) -> None:
        """Validate ``pooling``, ``features`` and ``downsamplings`` as soon as the model is constructed."""
        check_pooling(self.pooling)
        if len(self.features) == 0:
            raise ValueError("SmallCNN needs at least one conv: features must not be empty")
        if self.downsamplings is not None and not 0 <= self.downsamplings <= len(self.features) - 1:
            raise ValueError(
                f"downsamplings must be in [0, {len(self.features) - 1}] for {len(self.features)} convs, got {self.downsamplings}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Return the logits ``(N, num_classes)`` of NHWC images ``x`` (``train`` is unused: no BatchNorm)."""
        del train
        x = jnp.asarray(x, self.dtype)
        pools = len(self.features) - 1 if self.downsamplings is None else self.downsamplings
        for i, features in enumerate(self.features, start=1):
            if 1 < i <= pools + 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{i}")(x))
        x = global_pool(x, self.pooling)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def small_cnn(
    num_classes: int = 10,
    features: Sequence[int] = (16, 32, 64),
    pooling: str = "avg",
    dtype: Dtype = jnp.float32,
    downsamplings: int | None = None,
) -> SmallCNN:
    """A small CNN: ``conv1``..``convK`` with ``features`` channels, global pooling, Dense ``fc``
    (``downsamplings`` 2x2 max-pools, default ``K - 1``)."""
    return SmallCNN(
        features=tuple(int(f) for f in features),
        num_classes=num_classes,
        pooling=pooling,
        dtype=dtype,
        downsamplings=downsamplings,
    )
