"""What an audit folder records about its run, and what a rerun must match to add rows to it: the
settings (the manifest's resume fields, stored in every part's metadata too), the fingerprint of the
weights, the checks of the parts, the manifest and the other processes against this run's settings, and
the counts of the rows recorded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxcam import distributed
from flaxcam._optional import require
from flaxcam.audit import store
from flaxcam.audit.errors import AuditSettingsError

#: Fields of the manifest that must match for a rerun to resume an existing audit.
_RESUME_FIELDS = (
    "schema_version",
    "model_fingerprint",
    "method",
    "layer",
    "source_spec",
    "source_length",
    "preprocessing",
    "top_k",
    "target",
    "border",
    "corner",
    "threshold",
    "box_resolution",
    "class_names",
    "box_rule",
)


def model_fingerprint(variables: Any) -> str:
    """SHA-256 over the variables' paths, shapes, dtypes and values (identifies the weights audited)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def settings_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that must match for a run to add rows to an existing audit: :data:`_RESUME_FIELDS`
    of the manifest, as they read back from JSON. Stored in every part's metadata
    (:data:`store.SETTINGS_KEY`) and checked against each part on resume."""
    return json.loads(store.canonical_json({name: manifest.get(name) for name in _RESUME_FIELDS}))


def _shorten(value: Any, width: int = 60) -> str:
    text = repr(value)
    if len(text) <= width:
        return text
    return repr(value[: width - 3] + "…") if isinstance(value, str) else text[: width - 1] + "…"


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """``"name: stored -> current; ..."`` for every resume field that differs (a fingerprint by its
    first 12 hex digits)."""
    names = [name for name in _RESUME_FIELDS if stored.get(name) != current.get(name)]
    width = {"model_fingerprint": 15}
    return "; ".join(
        f"{name}: {_shorten(stored.get(name), width.get(name, 60))} -> {_shorten(current.get(name), width.get(name, 60))}"
        for name in names
    )


_START_OVER = "use another --out folder, or resume=False (--no-resume) to discard it and start over"


def _check_parts(out_dir: Path, settings: Mapping[str, Any]) -> list[int] | None:
    """Refuse (:class:`AuditSettingsError`) if any part or errors part in ``out_dir`` was written with
    other settings than ``settings`` (or with none recorded); returns the parts' ``low_res_shape``."""
    expected = store.canonical_json(settings)
    paths = [*store.part_files(out_dir, "part"), *store.part_files(out_dir, "errors")]
    foreign: dict[str, list[str]] = {}
    low_res_shape = None
    for path in paths:
        metadata = store.part_metadata(path)
        recorded = metadata.get(store.SETTINGS_KEY)
        if recorded != expected:
            foreign.setdefault(recorded or "", []).append(path.name)
        elif low_res_shape is None and store.LOW_RES_SHAPE_KEY in metadata:
            low_res_shape = json.loads(metadata[store.LOW_RES_SHAPE_KEY])
    if foreign:
        count = sum(len(names) for names in foreign.values())
        recorded, names = next(iter(foreign.items()))
        why = (
            f"other settings ({_differences(json.loads(recorded), settings)})"
            if recorded
            else "no recorded settings (an older flaxcam)"
        )
        raise AuditSettingsError(
            f"{out_dir}: {count} of {len(paths)} parts were written with {why}, e.g. {names[0]}; {_START_OVER}"
        )
    return low_res_shape


def _check_manifest(previous: Mapping[str, Any], settings: Mapping[str, Any], out_dir: Path, has_parts: bool) -> None:
    """Refuse if the manifest's settings differ from this run's (the parts were checked already)."""
    differing = _differences(settings_of(previous), settings)
    if differing:
        hint = (
            f"its parts match this run: delete {out_dir / store.MANIFEST} to rebuild it from them"
            if has_parts
            else _START_OVER
        )
        raise AuditSettingsError(f"{out_dir} holds an audit with different settings ({differing}); {hint}")


def _check_same_settings(settings: Mapping[str, Any], process_count: int) -> None:
    """With several processes, refuse in every one of them (:class:`AuditSettingsError`) unless all
    run with the same settings (weights, method, layer, source, preprocessing, ...): compares a
    SHA-256 of :func:`settings_of` across processes, so no process writes rows of another audit."""
    if process_count < 2:
        return
    differing = distributed.differing_processes(settings)
    if differing:
        raise AuditSettingsError(
            f"process(es) {', '.join(map(str, differing))} of this run have other settings than process 0 (weights, method, "
            "layer, source, preprocessing, top-k, target or box settings): start every process with the same command"
        )


def _clear(out_dir: Path) -> None:
    for path in [*store.part_files(out_dir, "part"), *store.part_files(out_dir, "errors"), out_dir / store.MANIFEST]:
        path.unlink(missing_ok=True)


def _counts(out_dir: Path, total: int) -> dict[str, Any]:
    rows = sum(_row_count(p) for p in store.part_files(out_dir, "part"))
    errors = sum(_row_count(p) for p in store.part_files(out_dir, "errors"))
    return {
        "counts": {"total": total, "rows": rows, "errors": errors},
        "parts": [p.name for p in store.part_files(out_dir, "part")],
        "error_parts": [p.name for p in store.part_files(out_dir, "errors")],
    }


def _row_count(path: Path) -> int:
    pq = require("pyarrow.parquet", extra="audit")

    return pq.ParquetFile(path).metadata.num_rows
