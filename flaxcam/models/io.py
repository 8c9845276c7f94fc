"""Model bundles: one msgpack file holding a registry model's name, kwargs, variables and metadata.

A bundle is ``flax.serialization.msgpack_serialize`` of::

    {"model_name": str, "model_kwargs": dict, "meta": dict, "variables": {"params": ..., ...}}

``model_kwargs`` must be JSON-like (str, int, float, bool, None, lists/tuples, dicts with str keys), since
the model is rebuilt with :func:`flaxcam.models.create_model`. ``meta`` is free-form (class names, input
size, normalization mean/std, ...); it may also hold numpy arrays. Tuples are stored as lists and come
back as tuples.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

from flaxcam.files import atomic_write_bytes

__all__ = ["check_variables", "load_bundle", "save_bundle"]

_FIELDS = ("model_name", "model_kwargs", "meta", "variables")


def _to_storable(value: Any, where: str, *, arrays: bool) -> Any:
    """Convert tuples to lists recursively and check that every leaf can be stored."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _to_storable(v, f"{where}.{k}", arrays=arrays)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_storable(v, f"{where}[{i}]", arrays=arrays) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if arrays and isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value)
    kind = "JSON-like values or numpy arrays" if arrays else "JSON-like values"
    raise TypeError(f"{where}: cannot store {type(value).__name__} {value!r} in a bundle (only {kind})")


def _lists_to_tuples(value: Any) -> Any:
    """Inverse of the tuple -> list conversion of :func:`_to_storable` (arrays are left alone)."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def save_bundle(
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    variables: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a model bundle to ``path`` atomically, with the usual file permissions
    (:func:`flaxcam.files.atomic_write`).

    Args:
        path: the bundle file to (over)write.
        model_name: a key of :data:`flaxcam.models.MODELS`.
        model_kwargs: JSON-like constructor kwargs, e.g. ``{"num_classes": 10, "features": (16, 32)}``.
        variables: the model's variables (``params`` and e.g. ``batch_stats``); stored as numpy.
        meta: optional free-form metadata (class names, input size, normalization mean/std, ...).
    """
    from flaxcam.models import MODELS

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}: valid names are {', '.join(sorted(MODELS))}")
    payload = {
        "model_name": model_name,
        "model_kwargs": _to_storable(dict(model_kwargs), "model_kwargs", arrays=False),
        "meta": _to_storable(dict(meta or {}), "meta", arrays=True),
        "variables": jax.tree.map(np.asarray, _to_storable_tree(variables)),
    }
    data = serialization.msgpack_serialize(payload, in_place=True)
    atomic_write_bytes(path, data)


def _to_storable_tree(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Plain nested dicts of the variables (FrozenDict and other mappings unfrozen)."""
    return {k: _to_storable_tree(v) if isinstance(v, Mapping) else v for k, v in variables.items()}


def load_bundle(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Read a bundle written by :func:`save_bundle`: ``(model, variables, meta)``.

    The model is rebuilt with ``create_model(model_name, **model_kwargs)``; variables are numpy arrays
    (``model.apply`` accepts them as they are).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a valid bundle (corrupt, truncated, or missing fields).
    """
    from flaxcam.models import create_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model bundle not found: {path}")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # msgpack raises several unrelated exception types on garbage
        raise ValueError(f"{path} is not a valid flaxcam model bundle (corrupt or truncated): {err}") from err
    if not isinstance(payload, dict) or any(field not in payload for field in _FIELDS):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a valid flaxcam model bundle: expected fields {_FIELDS}, found {found}")
    if not isinstance(payload["variables"], dict) or not isinstance(payload["model_kwargs"], dict):
        raise ValueError(f"{path} is not a valid flaxcam model bundle: malformed variables or model_kwargs")
    try:
        model = create_model(payload["model_name"], **_lists_to_tuples(payload["model_kwargs"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot rebuild model {payload['model_name']!r}: {err}") from err
    meta = _lists_to_tuples(payload["meta"] or {})
    return model, payload["variables"], meta


def check_variables(
    model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...], where: str = "the variables"
) -> None:
    """Check that ``variables`` fit ``model`` (the same collections, names and shapes as
    ``model.init`` gives for inputs of ``input_shape``; shapes only, nothing is computed).

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped variables (at most 5 of each), e.g.
            for a bundle whose ``model_kwargs`` say 16 channels where its weights have 8.
    """
    from flax import traverse_util

    try:
        expected = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jax.numpy.zeros(input_shape, jax.numpy.float32))
        )
    except Exception as err:
        raise ValueError(f"{where}: cannot build the model for inputs of shape {input_shape}: {err}") from None
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(_to_storable_tree(expected)).items()}
    try:
        have = {
            "/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(_to_storable_tree(variables)).items()
        }
    except (AttributeError, TypeError) as err:
        raise ValueError(f"{where}: malformed variables ({err})") from None
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if mismatched:
            parts.append(
                "shape mismatch " + ", ".join(f"{k}: {have[k]} (model wants {want[k]})" for k in mismatched[:5])
            )
        raise ValueError(f"{where}: the variables do not match the model its kwargs build ({'; '.join(parts)})")
