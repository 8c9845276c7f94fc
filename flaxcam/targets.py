"""What to explain: which class score(s) of each image the maps are computed for.

A target selection turns the model's logits ``(B, K)`` into target scores ``(B, T)`` (T maps per image)
and the class index of each: the top-scoring class (default), explicit classes per image, or the top-k
classes of each image (k maps from one forward pass). The score of a class is its logit, as in
pytorch-grad-cam's ``ClassifierOutputTarget`` and torchcam.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How targets are chosen. ``kind``: ``"argmax"``, ``"classes"`` (given per image) or ``"top_k"``."""

    kind: Literal["argmax", "classes", "top_k"]
    count: int = 1  # targets per image (T)


def resolve_targets(
    targets: int | np.ndarray | list | None,
    top_k: int | None,
    batch_size: int,
    num_classes: int,
) -> tuple[TargetSpec, np.ndarray | None]:
    """Validate the user's ``targets`` / ``top_k`` and return the spec and the explicit class array.

    ``targets`` may be ``None`` (argmax), one int (that class for every image), a sequence of ``B``
    ints (one class per image) or a ``(B, T)`` array (T classes per image). Returns ``(spec, classes)``
    where ``classes`` is an int32 ``(B, T)`` array for explicit targets, else ``None``.
    """
    if targets is not None and top_k is not None:
        raise ValueError("pass either targets= or top_k=, not both")
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k must be an int between 1 and the number of classes ({num_classes}), got {top_k!r}")
        return TargetSpec("top_k", int(top_k)), None
    if targets is None:
        return TargetSpec("argmax", 1), None
    classes = np.asarray(targets)
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {classes.dtype}")
    if classes.ndim == 0:
        classes = np.full((batch_size, 1), int(classes))
    elif classes.ndim == 1:
        classes = classes[:, None]
    if classes.ndim != 2 or classes.shape[0] != batch_size:
        raise ValueError(
            f"targets must be an int, {batch_size} ints (one per image) or a ({batch_size}, T) array; "
            f"got shape {np.asarray(targets).shape}"
        )
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise ValueError(
            f"target classes must be in [0, {num_classes}); got {sorted(set(classes[bad].tolist()))[:10]}"
        )
    return TargetSpec("classes", classes.shape[1]), classes.astype(np.int32)


def select_classes(spec: TargetSpec, logits: Array, classes: Array | None) -> Array:
    """The ``(B, T)`` int32 class indices to explain, given the logits (no gradient flows through)."""
    logits = jax.lax.stop_gradient(logits)
    if spec.kind == "argmax":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
    if spec.kind == "top_k":
        return jax.lax.top_k(logits, spec.count)[1].astype(jnp.int32)
    if classes is None:
        raise ValueError("explicit targets missing")
    return classes


def class_scores(logits: Array, classes: Array) -> Array:
    """``scores[b, t] = logits[b, classes[b, t]]``: the logit of each target class."""
    return jnp.take_along_axis(logits, classes, axis=1)
