"""Shared pieces of the faithfulness metrics: the target score of a batch and the input checks.

Every metric takes ``apply_fn(variables, images) -> logits (B, K)`` (e.g. a linen ``model.apply``;
it is a static argument of the jitted programs, so pass the same function object each time),
``variables``, ``images`` ``(B, H, W, C)`` preprocessed as the model expects, ``maps`` ``(B, H, W)`` at
the input resolution (flaxcam's maps are in [0, 1]) and ``targets`` ``(B,)`` class indices. The score of
a class is its logit (``score="logit"``, pytorch-grad-cam's ``ClassifierOutputTarget``) or its softmax
probability (``score="softmax"``, its ``ClassifierOutputSoftmaxTarget`` and torchcam's
``logits_fn=partial(torch.softmax, dim=-1)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ApplyFn = Callable[[Any, Array], Array]

SCORES = ("logit", "softmax")


def target_scores(apply_fn: ApplyFn, variables: Any, images: Array, targets: Array, score: str) -> Array:
    """``(B,)`` score of each image's target class: ``logits[b, t_b]`` or ``softmax(logits)[b, t_b]``."""
    logits = apply_fn(variables, images)
    if score == "softmax":
        logits = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=1)[:, 0]


def check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")


def check_inputs(images: Any, maps: Any, targets: Any) -> tuple[Array, Array, Array]:
    """Validate and convert ``images (B, H, W, C)``, ``maps (B, H, W)`` (finite) and ``targets (B,)``.

    One clear ValueError per problem; the NaN check reads the maps back once (the metrics' jitted
    implementations, ``*_impl``, skip it)."""
    images = jnp.asarray(images)
    maps = jnp.asarray(maps)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}")
    batch, height, width, _ = images.shape
    if maps.shape != (batch, height, width):
        raise ValueError(
            f"maps must have shape (B, H, W) = {(batch, height, width)} (one map per image at the input "
            f"resolution; for Explanation.maps of shape (B, T, H, W) pass maps[:, 0]), got {maps.shape}"
        )
    if not bool(jnp.all(jnp.isfinite(maps))):
        bad = np.flatnonzero(~np.isfinite(np.asarray(maps)).reshape(batch, -1).all(axis=1))
        raise ValueError(f"maps contain NaN or infinite values (images {bad.tolist()})")
    targets = jnp.asarray(targets)
    if targets.ndim == 0:
        targets = jnp.broadcast_to(targets, (batch,))
    if targets.shape != (batch,) or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be one int class per image, shape ({batch},), got {targets.shape} {targets.dtype}"
        )
    return images, maps.astype(images.dtype), targets


def check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_percentiles(percentiles: Any) -> tuple[float, ...]:
    """Percentiles as a tuple of floats, each strictly inside (0, 100)."""
    values = tuple(float(p) for p in np.atleast_1d(np.asarray(percentiles, dtype=np.float64)))
    if not values:
        raise ValueError("percentiles must not be empty")
    bad = [p for p in values if not 0 < p < 100]
    if bad:
        raise ValueError(f"percentiles must lie strictly inside (0, 100), got {bad}")
    return values
