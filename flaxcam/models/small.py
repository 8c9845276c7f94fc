"""A small BatchNorm-free CNN for tests and demos (fast on CPU at 64x64..128x128 inputs).

Layout: ``conv1`` (3x3 + ReLU), 2x2 max-pool, ``conv2`` (3x3 + ReLU), 2x2 max-pool, ..., the last conv's
output globally pooled (a plain function, not a module), then the Dense ``fc``. The last conv
(``conv{len(features)}``, ``conv3`` by default) is the natural CAM target layer. ``downsamplings`` limits
the number of 2x2 max-pools (the first convs get them), for a finer last feature map: with
``features=(16, 32, 64, 128)`` and ``downsamplings=2`` a 64x64 input gives a 16x16 map instead of 8x8.
``kernel_sizes`` sets each conv's (odd) kernel size, e.g. 1x1 convs that add depth and channels without
growing the receptive field (BagNet-style local evidence, Brendel & Bethge, ICLR 2019);
``reference_class=True`` pins the last class's logit at 0 (a background class as the reference category
of a multinomial logit, see :class:`SmallCNN`).
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
        kernel_sizes: odd kernel size of each conv (same length as ``features``); ``None`` (default): all 3.
        reference_class: if True, the last class (e.g. a digit-free ``background`` class) is the
            reference category of the multinomial logit: its logit is fixed at 0. ``fc`` keeps its
            ``(C, num_classes)`` kernel, but the last column and bias start at 0 and get no gradient, so
            they stay 0 in training and CAM's identity ``logit = mean(CAM) + bias`` still holds for every
            class (the reference class's map is 0). Why: softmax is unchanged when one vector is added to
            every class's weights, so with a learned background row, weight decay moves evidence that all
            foreground classes share ("there is an object here") mostly onto the background row
            (``-K/(K+1)`` of it, ``1/(K+1)`` left in each foreground class). With that row pinned, the
            shared evidence stays in every foreground class's weights, hence in their CAMs.
    """

    features: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    pooling: str = "avg"
    dtype: Dtype = jnp.float32
    downsamplings: int | None = None
    kernel_sizes: Sequence[int] | None = None
    reference_class: bool = False

    def __post_init__(self) -> None:
        """Validate ``pooling``, ``features`` and ``downsamplings`` as soon as the model is constructed."""
        check_pooling(self.pooling)
        if len(self.features) == 0:
            raise ValueError("SmallCNN needs at least one conv: features must not be empty")
        if self.downsamplings is not None and not 0 <= self.downsamplings <= len(self.features) - 1:
            raise ValueError(
                f"downsamplings must be in [0, {len(self.features) - 1}] for {len(self.features)} convs, got {self.downsamplings}"
            )
        if self.kernel_sizes is not None:
            if len(self.kernel_sizes) != len(self.features):
                raise ValueError(
                    f"kernel_sizes needs one size per conv ({len(self.features)}), got {list(self.kernel_sizes)}"
                )
            if any(int(k) < 1 or int(k) % 2 == 0 for k in self.kernel_sizes):
                raise ValueError(f"kernel_sizes must be odd and >= 1 (same padding), got {list(self.kernel_sizes)}")
        if self.reference_class and self.num_classes < 2:
            raise ValueError(
                f"reference_class needs at least 2 classes (the last one is the reference), got num_classes={self.num_classes}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Return the logits ``(N, num_classes)`` of NHWC images ``x`` (``train`` is unused: no BatchNorm)."""
        del train
        x = jnp.asarray(x, self.dtype)
        pools = len(self.features) - 1 if self.downsamplings is None else self.downsamplings
        kernel_sizes = (
            (3,) * len(self.features) if self.kernel_sizes is None else tuple(int(k) for k in self.kernel_sizes)
        )
        for i, (features, size) in enumerate(zip(self.features, kernel_sizes), start=1):
            if 1 < i <= pools + 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            pad = size // 2
            x = nn.Conv(features, (size, size), padding=((pad, pad), (pad, pad)), dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(x)
        x = global_pool(x, self.pooling)
        kernel_init = nn.initializers.lecun_normal()  # nn.Dense's default (its bias starts at 0 too)
        if self.reference_class:
            kernel_init = _without_last_column(kernel_init)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init, name="fc")(x)
        # the reference class: its logit is 0 and no gradient reaches its column or bias
        return logits.at[..., -1].set(0.0) if self.reference_class else logits


def _without_last_column(init: Any) -> Any:
    """``init`` with the last output column set to 0 (the reference class of ``reference_class``)."""

    def zero_last(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return init(key, shape, dtype).at[..., -1].set(0.0)

    return zero_last


def small_cnn(
    num_classes: int = 10,
    features: Sequence[int] = (16, 32, 64),
    pooling: str = "avg",
    dtype: Dtype = jnp.float32,
    downsamplings: int | None = None,
    kernel_sizes: Sequence[int] | None = None,
    reference_class: bool = False,
) -> SmallCNN:
    """A small CNN: ``conv1``..``convK`` with ``features`` channels, global pooling, Dense ``fc``
    (``downsamplings`` 2x2 max-pools, default ``K - 1``; ``kernel_sizes`` default all 3;
    ``reference_class`` see :class:`SmallCNN`)."""
    return SmallCNN(
        features=tuple(int(f) for f in features),
        num_classes=num_classes,
        pooling=pooling,
        dtype=dtype,
        downsamplings=downsamplings,
        kernel_sizes=None if kernel_sizes is None else tuple(int(k) for k in kernel_sizes),
        reference_class=bool(reference_class),
    )
