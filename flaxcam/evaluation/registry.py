"""The metric registry of the leaderboard: each metric's per-image score columns and which way is better.

A :class:`Metric` computes ``{column: (B,)}`` from a :class:`Batch` (model, images, one method's maps,
targets and the method itself for the metrics that re-explain). :func:`get_metrics` resolves
``"all"`` or a comma-separated list, with an error listing the valid names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flaxcam.evaluation.coherency import adcc
from flaxcam.evaluation.common import ApplyFn, Array
from flaxcam.evaluation.perturbation import deletion_insertion, masked_scores
from flaxcam.evaluation.road import DEFAULT_PERCENTILES, road
from flaxcam.evaluation.sanity import model_randomization

ExplainFn = Callable[[Any, Array, Array], Array]  # (variables, images, targets) -> maps (B, H, W)


def explainer(model: Any, method: str, layer: str | None = None, **explain_options) -> ExplainFn:
    """``explain_fn(variables, images, targets) -> (B, H, W)`` maps of ``method`` for one class per image,
    through :func:`flaxcam.explain` (one compiled program per shape; ``explain_options`` are its keyword
    arguments, e.g. ``chunk_size``, ``method_options``)."""
    import flaxcam

    def explain_fn(variables: Any, images: Array, targets: Array) -> Array:
        explanation = flaxcam.explain(
            model, variables, images, method=method, layer=layer, targets=jnp.asarray(targets), **explain_options
        )
        return explanation.maps[:, 0]

    return explain_fn


@dataclasses.dataclass
class Batch:
    """What a metric sees: ``apply_fn(variables, images) -> logits``, preprocessed ``images`` (B, H, W, C),
    one method's ``maps`` (B, H, W), ``targets`` (B,), ``explain_fn`` (that method, for coherency and the
    randomization check), ``fresh`` variables (a new initialization, for the randomization check), the
    metric ``options`` (``score``, ``steps``, ``baseline``, ``percentiles``, ``chunk_size``, ``key``,
    ``cascade``) and ``image_ids`` ``(B,)`` (dataset indices: they key ROAD's per-image noise)."""

    apply_fn: ApplyFn
    variables: Any
    images: Array
    maps: Array
    targets: Array
    explain_fn: ExplainFn | None = None
    fresh: Any = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    image_ids: Any = None

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)

    @property
    def args(self) -> tuple[ApplyFn, Any, Array, Array, Array]:
        return self.apply_fn, self.variables, self.images, self.maps, self.targets


@dataclasses.dataclass(frozen=True)
class Metric:
    """A leaderboard metric: ``compute(batch) -> {column: (B,)}``; ``columns`` maps each column to True
    when higher is better."""

    name: str
    compute: Callable[[Batch], dict[str, Array]]
    columns: Mapping[str, bool]
    description: str


def _confidence(batch: Batch) -> dict[str, Array]:
    score = batch.option("score", "softmax")
    original, masked = masked_scores(*batch.args, score=score)
    drop = jnp.maximum(original - masked, 0.0)
    relative = jnp.where(original > 0, drop / (original + 1e-7), jnp.nan)
    return {
        "confidence_change": masked - original,
        "drop_in_confidence": drop,
        "average_drop": relative,
        "increase_in_confidence": (masked > original).astype(masked.dtype),
    }


def _deletion(batch: Batch) -> dict[str, Array]:
    curves = deletion_insertion(
        *batch.args,
        steps=batch.option("steps", 20),
        baseline=batch.option("baseline", "zeros"),
        score=batch.option("score", "softmax"),
        chunk_size=batch.option("chunk_size", 32),
    )
    return {
        "deletion_auc": curves.deletion_auc,
        "insertion_auc": curves.insertion_auc,
        "deletion_curve": curves.deletion,
        "insertion_curve": curves.insertion,
    }


def _road(batch: Batch) -> dict[str, Array]:
    changes = road(
        *batch.args,
        percentiles=batch.option("percentiles", DEFAULT_PERCENTILES),
        score=batch.option("score", "softmax"),
        chunk_size=batch.option("chunk_size", 32),
        noise=batch.option("noise", 0.01),
        key=batch.option("key", None),
        image_ids=batch.image_ids,
    )
    morf, lerf = changes["morf"].mean(axis=0), changes["lerf"].mean(axis=0)
    return {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2}


def _missing(what: str, metric: str) -> ValueError:
    return ValueError(f"metric {metric!r} needs {what} (the method to re-explain with / fresh weights)")


def _needs(batch: Batch, what: str, metric: str) -> None:
    if getattr(batch, what) is None:
        raise _missing(what, metric)


def _explain_fn(batch: Batch, metric: str) -> ExplainFn:
    """``batch.explain_fn``, or the error of :func:`_needs` when there is none."""
    if batch.explain_fn is None:
        raise _missing("explain_fn", metric)
    return batch.explain_fn


def _adcc(batch: Batch) -> dict[str, Array]:
    method_fn = _explain_fn(batch, "adcc")
    explain_fn = lambda images, targets: method_fn(batch.variables, images, targets)
    values = adcc(explain_fn, *batch.args, score=batch.option("score", "softmax"))
    return {"adcc": values["adcc"], "coherency": values["coherency"], "complexity": values["complexity"]}


def classifier_layer(apply_fn: ApplyFn, variables: Any, images: Array) -> str:
    """The top-level parameter group holding the classifier: the one Dense kernel ``(features, K)`` whose
    ``K`` is the number of logits (parameter dicts are not in call order, so "the last one" is not it)."""
    classes = jax.eval_shape(apply_fn, variables, images).shape[-1]
    found = [
        name
        for name, group in variables["params"].items()
        if isinstance(group, Mapping)
        and getattr(group.get("kernel"), "ndim", 0) == 2
        and group["kernel"].shape[-1] == classes
    ]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the classifier layer ({found or 'no'} Dense kernel with {classes} outputs); "
            f"name the layers to randomize with options={{'cascade': [...]}}, from: {sorted(variables['params'])}"
        )
    return found[0]


def _randomization(batch: Batch) -> dict[str, Array]:
    explain_fn = _explain_fn(batch, "randomization")
    _needs(batch, "fresh", "randomization")
    cascade = batch.option("cascade", None) or [classifier_layer(batch.apply_fn, batch.variables, batch.images)]
    rho = model_randomization(explain_fn, batch.variables, batch.fresh, cascade[:1], batch.images, batch.targets)
    return {"randomization_rank_correlation": rho[0]}


METRICS: dict[str, Metric] = {
    "confidence": Metric(
        "confidence",
        _confidence,
        {"confidence_change": True, "drop_in_confidence": False, "average_drop": False, "increase_in_confidence": True},
        "score change under the map as a multiplicative mask (pgc, torchcam, Grad-CAM++ paper)",
    ),
    "deletion_insertion": Metric(
        "deletion_insertion",
        _deletion,
        {"deletion_auc": False, "insertion_auc": True},
        "RISE deletion / insertion AUC (torchcam)",
    ),
    "road": Metric(
        "road",
        _road,
        {"road_morf": False, "road_lerf": True, "road_combined": True},
        "ROAD averages over percentiles and combined (pgc)",
    ),
    "adcc": Metric(
        "adcc",
        _adcc,
        {"adcc": True, "coherency": True, "complexity": False},
        "ADCC: coherency, complexity, average drop (Poppi et al. 2021)",
    ),
    "randomization": Metric(
        "randomization",
        _randomization,
        {"randomization_rank_correlation": False},
        "rank correlation with the maps after re-initializing the top layer (Adebayo et al. 2018)",
    ),
}


def get_metrics(names: str | Sequence[str]) -> list[Metric]:
    """``"all"``, ``"road,adcc"`` or a list of names → the metrics; an unknown name is an error listing
    the valid ones."""
    if isinstance(names, str):
        names = list(METRICS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or names}; valid: all, {', '.join(METRICS)}")
    return [METRICS[n] for n in dict.fromkeys(names)]
