"""The model-parameter randomization test as a metric (Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim,
"Sanity Checks for Saliency Maps", NeurIPS 2018).

The layers of a trained model are re-initialized one after the other from the top (cascading
randomization), each step keeping the earlier ones; a method whose maps depend on what the model
learned must change. The score of a step is Spearman's rank correlation between the trained model's
maps and the randomized model's (:func:`flaxcam.metrics.rank_correlation`; 1 = unchanged, lower is
better; NaN where a map became constant).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flaxcam import metrics

Array = jax.Array


def randomize_layers(variables: Mapping[str, Any], fresh: Mapping[str, Any], layers: Sequence[str]) -> dict:
    """``variables`` with the parameters of the top-level ``layers`` replaced by those of ``fresh`` (a new
    initialization of the same model). An unknown layer is an error listing the model's layers."""
    params = dict(variables["params"])
    missing = [layer for layer in layers if layer not in params or layer not in fresh["params"]]
    if missing:
        raise ValueError(f"layers {missing} are not in the model's parameters; its layers: {sorted(params)}")
    for layer in layers:
        params[layer] = fresh["params"][layer]
    return {**variables, "params": params}


def model_randomization(
    explain_fn: Callable[[Mapping[str, Any], Array, Array], Array],
    variables: Mapping[str, Any],
    fresh: Mapping[str, Any],
    cascade: Sequence[str],
    images,
    targets,
) -> Array:
    """Cascading randomization, ``(len(cascade), B)``: row ``k`` is the rank correlation between the maps of
    the trained model and of the model with ``cascade[:k + 1]`` re-initialized (from ``fresh``).

    ``explain_fn(variables, images, targets) -> maps (B, H, W)`` explains with given weights (the
    targets stay those of the trained model, as in the paper). Lower is better; a method that passes
    the check drops well below 1 as soon as the top layer is randomized.
    """
    if not cascade:
        raise ValueError("cascade must name at least one layer (top layer first)")
    targets = jnp.asarray(targets)
    original = explain_fn(variables, images, targets)
    rows = []
    for depth in range(1, len(cascade) + 1):
        randomized = randomize_layers(variables, fresh, cascade[:depth])
        rows.append(metrics.rank_correlation(original, explain_fn(randomized, images, targets)))
    return jnp.stack(rows)
