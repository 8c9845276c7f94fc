"""The streaming audit runner: explain every image of a source, record predictions, boxes, attention
statistics and low-resolution maps in Parquet parts; resumable at any point.

Pipeline (all stages overlap): a background thread reads and batches the source (``flaxcam.data``,
grain) into a small queue → the main thread dispatches the jitted explain step and the jitted
:func:`flaxcam.audit.stats.summarize` for batch ``i`` (asynchronously, sharded over the local devices),
then fetches batch ``i - 1``'s results → a writer thread turns them into rows and writes a part file
every ``rows_per_part`` rows. Host memory is bounded by the queue depths and one part.

Where each part lives: :func:`run` here (checks, the manifest, the lock, the shard to do);
:mod:`flaxcam.audit.manifest` (what a rerun must match to resume, the counts recorded);
:mod:`flaxcam.audit.stream` (the read-ahead thread and the dispatch/fetch loop);
:mod:`flaxcam.audit.writer` (the writer thread and its part files); :mod:`flaxcam.audit.rows` (a
batch's results as rows, an Arrow table).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import flaxcam
from flaxcam import distributed, localize
from flaxcam.audit import stats as stats_lib
from flaxcam.audit import store
from flaxcam.audit.errors import AuditLockedError
from flaxcam.audit.lock import FolderLock
from flaxcam.audit.manifest import (
    _check_manifest,
    _check_parts,
    _check_same_settings,
    _clear,
    _counts,
    model_fingerprint,
    settings_of,
)
from flaxcam.audit.stream import _stream
from flaxcam.imageio import Preprocessing
from flaxcam.localize import DEFAULT_THRESHOLD

TARGET_MODES = ("predicted", "label")


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What :func:`run` did: the directory, the totals recorded so far and this call's throughput."""

    out_dir: Path
    total: int  # images in the source
    rows: int  # images recorded (all processes' parts)
    errors: int  # unreadable inputs recorded
    processed: int  # images handled by this call (0 when the audit was already complete)
    seconds: float
    complete: bool

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def shard_indices(total: int, shard_index: int, shard_count: int) -> np.ndarray:
    """The source indices process ``shard_index`` of ``shard_count`` audits: the contiguous part
    ``shard_index`` of ``range(total)`` split into near-equal parts (:func:`flaxcam.data.shard_indices`,
    the rule the data loader uses). The shards partition ``range(total)``."""
    from flaxcam.data import shard_indices as split

    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}"
        )
    return np.asarray(split(np.arange(total, dtype=np.int64), shard_index, shard_count), np.int64)


def _open(source: Any, out_dir: Path) -> tuple[Any, str | None]:
    """The source (from a spec or as given), never reading ``out_dir`` as data (a ``folder:`` source
    containing the output folder)."""
    if isinstance(source, (str, os.PathLike)):
        from flaxcam.data import open_source

        return open_source(str(source), exclude=[out_dir]), str(source)
    excluding = getattr(source, "excluding", None)
    if callable(excluding):
        source = excluding(out_dir)
    return source, getattr(source, "spec", None)


def _barrier(name: str) -> None:
    distributed.barrier(name)


def _lock(out_dir: Path, process: int, process_count: int) -> FolderLock:
    """This process's lock on ``out_dir`` (:mod:`flaxcam.audit.lock`); with several processes, all of
    them learn whether every one got its lock, and all refuse together if one did not."""
    lock = FolderLock(out_dir, process)
    failure: AuditLockedError | None = None
    try:
        lock.acquire()
    except AuditLockedError as error:
        failure = error
    if process_count > 1:
        from jax.experimental import multihost_utils

        locked = np.asarray(multihost_utils.process_allgather(np.int32(failure is None))).reshape(-1)
        if failure is None and not locked.all():
            lock.release()
            failed = ", ".join(str(i) for i in np.flatnonzero(locked == 0))
            failure = AuditLockedError(
                f"{out_dir} is in use by another audit (process(es) {failed} of this run "
                "could not lock it; see their messages)"
            )
    if failure is not None:
        raise failure
    return lock


def run(
    source: Any,
    model: Any,
    variables: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    preprocessing: Preprocessing,
    method: str = "cam",
    layer: str | None = None,
    batch_size: int = 64,
    top_k: int = 3,
    target: str = "predicted",
    devices: Sequence[jax.Device] | None = None,
    resume: bool = True,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    border: float = stats_lib.DEFAULT_BORDER,
    corner: float = stats_lib.DEFAULT_CORNER,
    box_resolution: int | None = 64,
    box_rule: str = "paper",
    rows_per_part: int = 4096,
    worker_count: int = 0,
    read_threads: int = 1,
    prefetch: int = 2,
    limit: int | None = None,
    model_info: Mapping[str, Any] | None = None,
    explain_kwargs: Mapping[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> AuditResult:
    """Audit every image of ``source`` with ``model``: explain it, and record per image the prediction,
    its probability, the top-k classes, the explained target, the 20%-rule box, attention statistics
    (:mod:`flaxcam.audit.stats`) and the low-resolution map, in Parquet parts under ``out_dir``.

    Args:
      source: an ``ImageSource`` (``flaxcam.data``) or a spec string for ``flaxcam.data.open_source``
        (``"folder:PATH"``, ``"ham10000:PATH"``, ``"tfds:NAME[:SPLIT]"``, ``"npz:PATH"``); the spec is
        recorded in the manifest so the report can re-read the images.
      model, variables: a Flax linen classifier and its variables (as for :func:`flaxcam.explain`).
      preprocessing: how images become model inputs (size, mean, std).
      method, layer: the CAM method and its (single) target layer; default layer: the last spatial one.
      batch_size: images per jitted call (padded to a bucket and sharded over ``devices``).
      top_k: classes recorded per image (the map explains one class: see ``target``).
      target: ``"predicted"`` (each image's top class) or ``"label"`` (its true class).
      devices: local devices to shard each batch over (default: all).
      resume: continue an existing audit in ``out_dir`` (same settings), skipping every image already
        recorded; ``False`` discards it and starts over.
      progress: show a progress bar with images/s.
      class_names: names of the model's classes (default: the source's).
      threshold: the box rule's fraction of the map maximum (0.2, the CAM paper's).
      border, corner: band width and corner side (fractions of the image) of the attention statistics.
      box_rule: the box rule, one of :data:`flaxcam.localize.BOX_RULES` (``"paper"``: ``threshold``).
      box_resolution: the box is computed on the map upsampled to at most this many pixels on its longer
        side, then scaled to input pixels (``None``: at the input resolution, exact but costly for large
        inputs; inputs no larger than this are always exact).
      rows_per_part: rows per Parquet part (the most work a kill can lose).
      worker_count: grain reader processes (0: read in a thread of this process).
      read_threads: grain reader threads per process (with ``worker_count=0`` more threads mostly
        contend for the GIL; raise it for sources that decode large files).
      prefetch: batches read ahead.
      limit: audit at most this many of the remaining images in this call (the rest stays to do).
      model_info: extra JSON-like facts about the model for the manifest (name, weights file, ...).
      explain_kwargs: extra keyword arguments of :func:`flaxcam.explain` (``head``, ``apply_kwargs``, ...).
      on_batch: called with the number of images done after every fetched batch (tests, monitoring).

    Multi-host (``jax.distributed.initialize()`` before): each process audits its contiguous shard
    (:func:`shard_indices` with ``jax.process_index()``) over its local devices and writes its own parts;
    ``out_dir`` must be a shared filesystem. Process 0 writes the manifest.

    Returns an :class:`AuditResult`.
    """
    if target not in TARGET_MODES:
        raise ValueError(f"target must be one of {TARGET_MODES}, got {target!r}")
    if layer is not None and not isinstance(layer, str):
        raise ValueError("an audit explains one layer: pass a single layer name (layer fusion is not supported here)")
    if batch_size < 1 or rows_per_part < 1:
        raise ValueError(f"batch_size and rows_per_part must be >= 1, got {batch_size}, {rows_per_part}")
    explain_kwargs = dict(explain_kwargs or {})
    for reserved in ("method", "layer", "targets", "top_k", "devices"):
        if reserved in explain_kwargs:
            raise ValueError(f"pass {reserved!r} to run() itself, not in explain_kwargs")
    if method not in flaxcam.METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(sorted(flaxcam.METHODS))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()
    process, process_count = jax.process_index(), jax.process_count()
    lock = _lock(out_dir, process, process_count)  # before any other work: a second audit refuses at once
    try:
        source, spec = _open(source, out_dir)
        devices = list(devices) if devices is not None else jax.local_devices()

        height, width = preprocessing.size
        dummy = np.zeros((1, height, width, 3), np.float32)
        apply_kwargs = tuple(sorted((explain_kwargs.get("apply_kwargs") or {}).items()))
        layers = flaxcam.list_layers(model, variables, dummy, apply_kwargs)
        from flaxcam.probe import resolve_layer

        layer_info = resolve_layer(layers, layer, spatial_only=explain_kwargs.get("reshape") is None)
        output = jax.eval_shape(lambda v, x: model.apply(v, x, **dict(apply_kwargs)), variables, dummy)
        output_fn = explain_kwargs.get("output_fn")
        num_classes = int((output_fn(output) if output_fn else output).shape[-1])
        k = max(1, min(int(top_k), num_classes))
        names = list(class_names) if class_names is not None else list(getattr(source, "class_names", ()) or ())
        if not names:
            names = [str(i) for i in range(num_classes)]
        total = len(source)
        manifest: dict[str, Any] = {
            "schema_version": store.SCHEMA_VERSION,
            "flaxcam_version": flaxcam.__version__,
            "model": type(model).__name__,
            "model_repr": repr(model)[:4000],
            "model_info": dict(model_info or {}),
            "model_fingerprint": model_fingerprint(variables),
            "num_classes": num_classes,
            "method": flaxcam.METHODS[method].name if method in flaxcam.METHODS else method,
            "layer": layer_info.name,
            "source_spec": spec,
            "source_type": type(source).__name__,
            "source_length": total,
            "class_names": names,
            "preprocessing": {
                "size": [height, width],
                "mean": list(preprocessing.mean),
                "std": list(preprocessing.std),
            },
            "top_k": k,
            "target": target,
            "threshold": float(threshold),
            "border": float(border),
            "corner": float(corner),
            "box_resolution": box_resolution,
            "box_rule": localize.check_rule(box_rule),
            "box_grid": list(stats_lib.box_grid((height, width), box_resolution)),
            "batch_size": batch_size,
            "process_count": process_count,
            "status": "running",
        }
        settings = settings_of(manifest)
        _check_same_settings(settings, process_count)

        manifest_path = out_dir / store.MANIFEST
        if not resume and process == 0:
            _clear(out_dir)
        _barrier("flaxcam-audit-start")
        store.remove_stale_temporaries(out_dir, process)
        # Resume only onto this run's own settings: every part is checked (a lost or foreign manifest
        # cannot make a run adopt other rows), then the manifest; a lost manifest is rebuilt below.
        low_res_shape = _check_parts(out_dir, settings)
        previous = store.read_manifest(out_dir) if manifest_path.exists() else {}
        if previous:
            has_parts = bool(store.part_files(out_dir, "part") or store.part_files(out_dir, "errors"))
            _check_manifest(previous, settings, out_dir, has_parts=has_parts)
        if process == 0:
            repaired = store.remove_duplicate_indices(out_dir)
            if repaired:
                warnings.warn(
                    f"{out_dir}: removed indices recorded twice from {len(repaired)} part(s) "
                    f"({', '.join(f'{name}: {count}' for name, count in sorted(repaired.items()))})",
                    stacklevel=2,
                )
        _barrier("flaxcam-audit-checked")
        done = store.done_indices(out_dir)
        remaining = np.setdiff1d(shard_indices(total, process, process_count), done, assume_unique=True)
        if limit is not None:
            remaining = remaining[: max(0, int(limit))]

        if process == 0 and (len(remaining) or previous.get("status") != "complete"):
            manifest["low_res_shape"] = previous.get("low_res_shape") or low_res_shape
            store.write_json(manifest_path, {**manifest, **_counts(out_dir, total)})
        if len(remaining) == 0:
            _barrier("flaxcam-audit-end")
            return _finish(out_dir, manifest, total, 0, start_time, process)

        processed = _stream(
            source,
            model,
            variables,
            out_dir,
            preprocessing,
            remaining,
            manifest,
            devices,
            explain_kwargs,
            batch_size=batch_size,
            k=k,
            threshold=threshold,
            border=border,
            corner=corner,
            process=process,
            rows_per_part=rows_per_part,
            worker_count=worker_count,
            read_threads=read_threads,
            prefetch=prefetch,
            progress=progress,
            on_batch=on_batch,
        )
        _barrier("flaxcam-audit-end")
        return _finish(out_dir, manifest, total, processed, start_time, process)
    finally:
        lock.release()


def _finish(
    out_dir: Path, manifest: dict[str, Any], total: int, processed: int, start: float, process: int
) -> AuditResult:
    counts = _counts(out_dir, total)
    complete = counts["counts"]["rows"] + counts["counts"]["errors"] == total
    if process == 0:
        previous = store.read_manifest(out_dir)
        if processed or previous.get("status") != "complete":
            status = "complete" if complete else "incomplete"
            store.write_json(out_dir / store.MANIFEST, {**previous, **counts, "status": status})
    return AuditResult(
        out_dir=out_dir,
        total=total,
        rows=counts["counts"]["rows"],
        errors=counts["counts"]["errors"],
        processed=processed,
        seconds=time.perf_counter() - start,
        complete=complete,
    )
