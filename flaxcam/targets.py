"""What to explain: the score(s) of the model output that each map is computed for.

A target turns the model output into target scores ``(B, T)`` (T maps per image) and an int label per
score. Classifier targets (the default) take ``(B, K)`` logits: the top-scoring class, explicit classes
per image or the top-k classes, scored by their logit (pytorch-grad-cam's ``ClassifierOutputTarget``)
or their softmax probability (``score="softmax"``, its ``ClassifierOutputSoftmaxTarget``) or the ReST
score, logit minus cross-entropy (``score="rest"``, its ``ClassifierOutputReST``). The other
targets are objects passed as ``targets=``:

* :class:`Binary` — a single-logit binary classifier (``BinaryClassifierOutputTarget``);
* :class:`Segmentation` — the sum of a class's logits over a mask of a ``(B, H, W, K)`` segmentation
  output (``SemanticSegmentationTarget``);
* :class:`Embedding` — the cosine similarity of a ``(B, D)`` embedding with concept vectors
  (``SimilarityToConceptTarget``);
* a callable ``scores(output) -> (B,)`` or ``(B, T)`` — any score of the model output, traced inside the
  step (pytorch-grad-cam's callable targets); map ``t`` of an image explains column ``t``.

Target data (classes, masks, concepts) travels into the jitted step as arrays with a leading batch
axis; the kind of target is static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


#: The names of :data:`CLASS_SCORES` (how a class target's score is read from the logits).
ScoreName = Literal["logit", "softmax", "rest"]


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How targets are chosen (static). ``kind``: ``"argmax"``, ``"classes"``, ``"top_k"``,
    ``"binary"``, ``"segmentation"`` or ``"embedding"``; ``count``: targets per image (T)."""

    kind: Literal["argmax", "classes", "top_k", "binary", "segmentation", "embedding", "custom"]
    count: int = 1
    score: ScoreName = "logit"
    fn: Callable[[Array], Array] | None = None  # the "custom" kind's score function

    @property
    def chosen_from_output(self) -> bool:
        """True when the labels depend on the model output (argmax, top-k)."""
        return self.kind in ("argmax", "top_k")


@dataclasses.dataclass(frozen=True)
class Binary:
    """A binary classifier with one output logit per image: the score is the logit for
    ``category=1`` and minus the logit for ``category=0`` (one int for all images, or one per image)."""

    category: Any = 1


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Sum of class ``classes`` logits over ``masks`` of a ``(B, H, W, K)`` segmentation output.

    ``classes``: an int, ``B`` ints or a ``(B, T)`` array; ``masks``: ``(H, W)`` (shared), ``(B, H, W)``
    or ``(B, T, H, W)``, at the output's resolution (e.g. the predicted region of that class).
    """

    classes: Any
    masks: Any


@dataclasses.dataclass(frozen=True)
class Embedding:
    """Cosine similarity of a ``(B, D)`` embedding with concept vectors ``(D,)``, ``(T, D)`` (shared)
    or ``(B, T, D)`` (per image)."""

    concepts: Any


def _traced(values: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values))


def _xp(values: Any) -> Any:
    """NumPy for host data (validated, contiguous), jax.numpy for traced data (inside a jitted step)."""
    return jnp if _traced(values) else np


def _per_image(values: Any, batch: int, trailing: int, name: str) -> Any:
    """Broadcast ``values`` to ``(B, T, *trailing_dims)`` where ``trailing`` counts the data dims."""
    xp = _xp(values)
    array = xp.asarray(values)
    if array.ndim == trailing:  # one value for every image, one target
        array = xp.broadcast_to(array, (batch, 1, *array.shape))
    elif array.ndim == trailing + 1:
        if trailing and array.shape[0] != batch:  # (T, ...) shared by all images
            array = xp.broadcast_to(array, (batch, *array.shape))
        else:  # (B, ...)
            array = array[:, None]
    if array.ndim != trailing + 2 or array.shape[0] != batch:
        raise ValueError(f"{name} has shape {tuple(np.shape(values))}; expected one per image for {batch} images")
    return np.ascontiguousarray(array) if xp is np else array


def resolve_targets(
    targets: Any,
    top_k: int | None,
    batch_size: int,
    output_shape: tuple[int, ...],
    score: str = "logit",
) -> tuple[TargetSpec, dict[str, np.ndarray] | None]:
    """Validate the user's ``targets`` / ``top_k`` and return the static spec and the target data.

    For classifiers ``targets`` may be ``None`` (argmax), one int (that class for every image), ``B``
    ints (one class per image) or a ``(B, T)`` array. Returns ``(spec, data)``; ``data`` maps names to
    arrays with a leading batch axis (``None`` when the targets come from the output alone).
    Traced target arrays (inside a jitted step) are reshaped the same way; only their values are not
    checked (that needs the host).
    """
    if score not in CLASS_SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, CLASS_SCORES))}, got {score!r}")
    score_name = cast(ScoreName, score)  # validated just above
    if targets is not None and top_k is not None:
        raise ValueError("pass either targets= or top_k=, not both")
    if isinstance(targets, (Binary, Segmentation, Embedding)):
        return _resolve_object(targets, batch_size, output_shape)
    if callable(targets):
        return _resolve_custom(targets, batch_size, output_shape), None
    if len(output_shape) != 2:
        raise ValueError(
            f"class targets need (batch, classes) logits but the model output has shape {output_shape}; "
            "use targets=flaxcam.targets.Segmentation(...), Binary(...) or Embedding(...), or output_fn="
        )
    num_classes = output_shape[-1]
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k must be an int between 1 and the number of classes ({num_classes}), got {top_k!r}")
        return TargetSpec("top_k", int(top_k), score_name), None
    if targets is None:
        return TargetSpec("argmax", 1, score_name), None
    xp = _xp(targets)
    classes = xp.asarray(targets)
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {classes.dtype}")
    if classes.ndim == 0:
        classes = xp.broadcast_to(classes, (batch_size, 1))
    elif classes.ndim == 1:
        classes = classes[:, None]
    if classes.ndim != 2 or classes.shape[0] != batch_size:
        raise ValueError(
            f"targets must be an int, {batch_size} ints (one per image) or a ({batch_size}, T) array; "
            f"got shape {tuple(np.shape(targets))}"
        )
    _check_classes(classes, num_classes)
    return TargetSpec("classes", classes.shape[1], score_name), {"classes": classes.astype(np.int32)}


def _resolve_custom(fn: Callable[[Array], Array], batch: int, output_shape: tuple[int, ...]) -> TargetSpec:
    """The spec of a callable target: ``fn(output)`` must give ``(B,)`` or ``(B, T)`` scores."""
    try:
        scores = jax.eval_shape(fn, jax.ShapeDtypeStruct((batch, *output_shape[1:]), jnp.float32))
    except Exception as error:
        raise ValueError(f"the targets callable failed on a model output of shape {output_shape}: {error}") from error
    shape = tuple(getattr(scores, "shape", ()))
    if len(shape) not in (1, 2) or shape[0] != batch:
        raise ValueError(
            f"a targets callable must return (B,) or (B, T) scores for a (B, ...) model output; for output "
            f"shape {output_shape} it returned {shape}"
        )
    return TargetSpec("custom", 1 if len(shape) == 1 else shape[1], fn=fn)


def _check_classes(classes: Any, num_classes: int) -> None:
    if _traced(classes):
        return
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise ValueError(f"target classes must be in [0, {num_classes}); got {sorted(set(classes[bad].tolist()))[:10]}")


def _resolve_object(target: Any, batch: int, output_shape: tuple[int, ...]) -> tuple[TargetSpec, dict[str, np.ndarray]]:
    if isinstance(target, Binary):
        if len(output_shape) not in (1, 2) or (len(output_shape) == 2 and output_shape[1] != 1):
            raise ValueError(
                f"Binary targets need one logit per image, (B,) or (B, 1); the output has shape {output_shape}"
            )
        category = _per_image(target.category, batch, 0, "Binary.category").astype(np.int32)
        if not _traced(category) and not np.isin(category, (0, 1)).all():
            raise ValueError("Binary.category must be 0 or 1")
        return TargetSpec("binary", 1), {"classes": category}
    if isinstance(target, Segmentation):
        if len(output_shape) != 4:
            raise ValueError(
                f"Segmentation targets need a (B, H, W, K) output; the model output has shape {output_shape}"
            )
        classes = _per_image(target.classes, batch, 0, "Segmentation.classes").astype(np.int32)
        xp = _xp(target.masks)
        masks = xp.asarray(target.masks, np.float32)
        if masks.ndim == 2:
            masks = xp.broadcast_to(masks, (batch, *masks.shape))
        masks = _per_image(masks, batch, 2, "Segmentation.masks") if masks.ndim == 3 else masks
        if masks.ndim != 4 or masks.shape[0] != batch or masks.shape[2:] != tuple(output_shape[1:3]):
            raise ValueError(
                f"Segmentation.masks must be (H, W), (B, H, W) or (B, T, H, W) at the output's resolution "
                f"{tuple(output_shape[1:3])}; got {tuple(np.shape(target.masks))}"
            )
        masks = xp.broadcast_to(masks, (batch, classes.shape[1], *masks.shape[2:])) if masks.shape[1] == 1 else masks
        if masks.shape[1] != classes.shape[1]:
            raise ValueError(f"{classes.shape[1]} classes per image but {masks.shape[1]} masks per image")
        _check_classes(classes, output_shape[-1])
        return TargetSpec("segmentation", classes.shape[1]), {
            "classes": classes,
            "masks": masks if xp is jnp else np.ascontiguousarray(masks),
        }
    concepts = _xp(target.concepts).asarray(target.concepts, np.float32)
    if len(output_shape) != 2:
        raise ValueError(f"Embedding targets need a (B, D) output; the model output has shape {output_shape}")
    concepts = _per_image(concepts, batch, 1, "Embedding.concepts")
    if concepts.shape[-1] != output_shape[-1]:
        raise ValueError(f"concept vectors have {concepts.shape[-1]} dims but the embedding has {output_shape[-1]}")
    count = concepts.shape[1]
    labels = np.broadcast_to(np.arange(count, dtype=np.int32), (batch, count))
    return TargetSpec("embedding", count), {"classes": np.ascontiguousarray(labels), "concepts": concepts}


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


def rest_scores(logits: Array) -> Array:
    r"""The ReST score of every class ``(B, K)``: the logit minus the cross-entropy of that class,

    .. math:: y^c - \mathrm{CE}(y, c) = y^c - \big(\log \textstyle\sum_j e^{y^j} - y^c\big)
              = 2 y^c - \log \textstyle\sum_j e^{y^j}

    (pytorch-grad-cam's ``ClassifierOutputReST``; the default score of ShapleyCAM in Cai, "CAMs as
    Shapley Value-based Explainers", 2025, arXiv:2501.06261: the pre- and post-softmax information
    together, so that the explanation also counts what lowers the other classes).
    """
    return 2 * logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


#: How a class target's score is read from ``(B, K)`` logits (``explain(score=...)``): every class's
#: logit, softmax probability or ReST score.
CLASS_SCORES = {
    "logit": lambda logits: logits,
    "softmax": lambda logits: jax.nn.softmax(logits, axis=-1),
    "rest": rest_scores,
}


def class_scores(logits: Array, classes: Array) -> Array:
    """``scores[b, t] = logits[b, classes[b, t]]``: the logit of each target class."""
    return jnp.take_along_axis(logits, classes, axis=1)


def target_scores(spec: TargetSpec, output: Array, data: dict[str, Array] | None) -> tuple[Array, Array]:
    """``(scores (B, T), labels (B, T))`` of the model ``output`` for the target ``spec``."""
    classes = None if data is None else data.get("classes")
    if spec.kind in ("argmax", "classes", "top_k"):
        chosen = select_classes(spec, output, classes)
        return class_scores(CLASS_SCORES[spec.score](output), chosen), chosen
    if spec.kind == "custom":
        if spec.fn is None:
            raise TypeError("a 'custom' target spec needs its score function fn")
        scores = spec.fn(output)
        scores = scores.reshape(scores.shape[0], -1)
        return scores, jnp.broadcast_to(jnp.arange(scores.shape[1], dtype=jnp.int32), scores.shape)
    if data is None or classes is None:
        raise TypeError(f"{spec.kind!r} targets need their target data (with 'classes')")
    if spec.kind == "binary":
        logit = output.reshape(output.shape[0], 1)
        return jnp.where(classes == 1, logit, -logit), classes
    if spec.kind == "segmentation":
        per_class = jnp.take_along_axis(output, classes[:, None, None, :], axis=-1)  # (B, H, W, T)
        return jnp.einsum("bhwt,bthw->bt", per_class, data["masks"]), classes
    concepts = data["concepts"]  # (B, T, D)
    dot = jnp.einsum("bd,btd->bt", output, concepts)
    norms = jnp.maximum(jnp.linalg.norm(output, axis=-1)[:, None] * jnp.linalg.norm(concepts, axis=-1), 1e-8)
    return dot / norms, classes
