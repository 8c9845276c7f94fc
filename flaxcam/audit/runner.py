"""The streaming audit runner: explain every image of a source, record predictions, boxes, attention
statistics and low-resolution maps in Parquet parts; resumable at any point.

Pipeline (all stages overlap): a background thread reads and batches the source (``flaxcam.data``,
grain) into a small queue → the main thread dispatches the jitted explain step and the jitted
:func:`flaxcam.audit.stats.summarize` for batch ``i`` (asynchronously, sharded over the local devices),
then fetches batch ``i - 1``'s results → a writer thread turns them into rows and writes a part file
every ``rows_per_part`` rows. Host memory is bounded by the queue depths and one part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

import flaxcam
from flaxcam import distributed, localize
from flaxcam._optional import require
from flaxcam.audit import stats as stats_lib
from flaxcam.audit import store
from flaxcam.audit.errors import AuditError, AuditLockedError, AuditSettingsError
from flaxcam.audit.lock import FolderLock
from flaxcam.imageio import Preprocessing
from flaxcam.localize import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    import pyarrow as pa
else:
    pa = require("pyarrow", extra="audit")

TARGET_MODES = ("predicted", "label")

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


def model_fingerprint(variables: Any) -> str:
    """SHA-256 over the variables' paths, shapes, dtypes and values (identifies the weights audited)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class _Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead; re-raises its errors in the consumer."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True, name="flaxcam-audit-read")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer
            self._put(("__error__", error))
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "__error__":
                raise item[1]
            yield item

    def close(self) -> None:
        self._stop.set()


class _PartWriter:
    """Background thread that turns fetched batch results into rows and writes part files atomically.

    A failure in the thread (a full disk: :class:`AuditWriteError`) is kept and raised in the main
    thread by the next :meth:`put` or by :meth:`close`; later batches are dropped, never waited on.
    Every part carries ``metadata`` (the run's settings) in its Parquet key-value metadata."""

    def __init__(self, out_dir: Path, process: int, rows_per_part: int, metadata: Mapping[str, str], depth: int = 4):
        self.out_dir = out_dir
        self.process = process
        self.rows_per_part = rows_per_part
        self.metadata = dict(metadata)
        self.sequence = store.next_sequence(out_dir, process)
        self.parts_written: list[str] = []
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._columns: list[dict[str, Any]] = []
        self._errors: list[tuple[int, str, str]] = []
        self._pending_rows = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="flaxcam-audit-write")
        self._thread.start()

    def put(self, batch: _BatchMeta, summary: Mapping[str, np.ndarray], errors: list[tuple[int, str, str]]) -> None:
        """Queue a fetched batch; its rows are built (boxes included) in the writer thread."""
        self._raise_if_failed()
        self._queue.put((batch, summary, errors))

    def close(self, *, raise_error: bool = True) -> None:
        """Write what is pending, stop the thread and (``raise_error``) raise its failure, if any."""
        self._queue.put(None)
        self._thread.join()
        if raise_error:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        if isinstance(self._error, AuditError):
            raise self._error
        raise RuntimeError(f"writing audit parts to {self.out_dir} failed: {self._error}") from self._error

    def _loop(self) -> None:
        # One loop, one end marker: after a failure, items are dropped until the marker from close().
        while True:
            item = self._queue.get()
            if self._error is None:
                try:
                    self._flush() if item is None else self._add(*item)
                except BaseException as error:  # raised in the main thread by put() / close()
                    self._error = error
            if item is None:
                return

    def _add(self, batch: _BatchMeta, summary: Mapping[str, np.ndarray], errors: list[tuple[int, str, str]]) -> None:
        columns = _host_columns(batch, summary, self.process)
        if columns is not None and len(columns["index"]):
            self._columns.append(columns)
            self._pending_rows += len(columns["index"])
        self._errors.extend(errors)
        if self._pending_rows >= self.rows_per_part or len(self._errors) >= self.rows_per_part:
            self._flush()

    def _next_path(self, kind: str) -> Path:
        path = self.out_dir / store.part_name(kind, self.process, self.sequence)
        self.sequence += 1
        return path

    def _flush(self) -> None:
        # Errors first: an index is in exactly one file, so either order keeps "exactly once"; a kill
        # between the two writes only re-does the rows.
        if self._errors:
            path = self._next_path("errors")
            store.write_part(path, store.errors_table(self._errors, self.process), self.metadata)
            self.parts_written.append(path.name)
            self._errors = []
        if self._columns:
            path = self._next_path("part")
            shape = list(self._columns[0]["low_res"].shape[1:])
            metadata = {**self.metadata, store.LOW_RES_SHAPE_KEY: store.canonical_json(shape)}
            store.write_part(path, _rows_to_table(self._columns), metadata)
            self.parts_written.append(path.name)
            self._columns = []
            self._pending_rows = 0


def _list_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    count, width = values.shape
    offsets = pa.array(np.arange(0, (count + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), value_type))


def _rows_to_table(chunks: list[dict[str, Any]]) -> pa.Table:
    columns = {
        name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0] if name not in ("id", "low_res")
    }
    ids = [value for chunk in chunks for value in chunk["id"]]
    low_res = np.concatenate([chunk["low_res"] for chunk in chunks])
    arrays: dict[str, pa.Array] = {}
    for field in store.SCHEMA:
        name = field.name
        if name == "id":
            arrays[name] = pa.array(ids, pa.string())
        elif name == "low_res":
            flat = low_res.reshape(len(low_res), -1)
            arrays[name] = pa.array([row.tobytes() for row in flat], pa.binary())
        elif name in ("topk_classes", "topk_probs"):
            arrays[name] = _list_array(columns[name], field.type.value_type)
        elif name == "correct":
            labels = columns["label"]
            arrays[name] = pa.array(columns["pred"] == labels, pa.bool_(), mask=labels < 0)
        else:
            arrays[name] = pa.array(columns[name], field.type)
    return pa.table(arrays, schema=store.SCHEMA)


@dataclasses.dataclass(frozen=True)
class _BatchMeta:
    """What the writer needs of a batch (not its images)."""

    indices: np.ndarray
    ids: list[str]
    labels: np.ndarray
    valid: np.ndarray
    boxes: np.ndarray
    input_size: tuple[int, int]

    @classmethod
    def of(cls, batch: Any) -> _BatchMeta:
        return cls(
            np.asarray(batch.indices),
            list(batch.ids),
            np.asarray(batch.labels),
            np.asarray(batch.valid, bool),
            np.asarray(batch.boxes, np.float32),
            tuple(np.shape(batch.images)[1:3]),
        )


def _host_columns(batch: _BatchMeta, summary: Mapping[str, np.ndarray], process: int) -> dict[str, Any] | None:
    """The rows of one batch (valid images only) as NumPy columns; boxes from the foreground masks."""
    valid = batch.valid & (batch.indices >= 0)
    if not valid.any():
        return None
    keep = np.flatnonzero(valid)
    gt = batch.boxes[keep]
    mask = summary["box_mask"][keep]
    box = stats_lib.scale_boxes(stats_lib.largest_component_boxes(mask), mask.shape[1:], batch.input_size)
    corners = np.stack([summary[f"corner_{c}_share"][keep] for c in stats_lib.CORNERS])
    columns: dict[str, Any] = {
        "index": np.asarray(batch.indices, np.int64)[keep],
        "id": [batch.ids[i] for i in keep],
        "label": np.asarray(batch.labels, np.int32)[keep],
        "box_x0": box[:, 0],
        "box_y0": box[:, 1],
        "box_x1": box[:, 2],
        "box_y1": box[:, 3],
        "box_iou": stats_lib.box_iou_xyxy(box, gt),
        "gt_x0": gt[:, 0],
        "gt_y0": gt[:, 1],
        "gt_x1": gt[:, 2],
        "gt_y1": gt[:, 3],
        "corner_max_share": np.max(corners, axis=0),
        "process": np.full(len(keep), process, np.int32),
    }
    for name in (
        "pred",
        "prob",
        "target",
        "target_prob",
        "topk_classes",
        "topk_probs",
        "low_res",
        "border_share",
        "gt_share",
        "entropy",
        "peak_y",
        "peak_x",
        "com_y",
        "com_x",
    ):
        columns[name] = summary[name][keep]
    for corner in stats_lib.CORNERS:
        columns[f"corner_{corner}_share"] = summary[f"corner_{corner}_share"][keep]
    return columns


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


def _clear(out_dir: Path) -> None:
    for path in [*store.part_files(out_dir, "part"), *store.part_files(out_dir, "errors"), out_dir / store.MANIFEST]:
        path.unlink(missing_ok=True)


def _barrier(name: str) -> None:
    distributed.barrier(name)


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


def _stream(
    source,
    model,
    variables,
    out_dir,
    preprocessing,
    remaining,
    manifest,
    devices,
    explain_kwargs,
    *,
    batch_size,
    k,
    threshold,
    border,
    corner,
    process,
    rows_per_part,
    worker_count,
    read_threads,
    prefetch,
    progress,
    on_batch,
) -> int:
    from tqdm.auto import tqdm

    from flaxcam.data import iterate_batches

    batches = _Prefetcher(
        iter(
            iterate_batches(
                source,
                preprocessing,
                batch_size,
                indices=remaining,
                worker_count=worker_count,
                read_threads=read_threads,
                prefetch=max(1, read_threads),
            )
        ),
        prefetch,
    )
    writer = _PartWriter(
        out_dir, process, rows_per_part, {store.SETTINGS_KEY: store.canonical_json(settings_of(manifest))}
    )
    threshold = float(threshold)
    low_res_shape: list[int] | None = None
    processed = 0

    def dispatch(batch):
        targets = np.maximum(np.asarray(batch.labels), 0) if manifest["target"] == "label" else None
        explanation = flaxcam.explain(
            model,
            variables,
            batch.images,
            method=manifest["method"],
            layer=manifest["layer"],
            targets=targets,
            devices=devices,
            image_ids=np.maximum(np.asarray(batch.indices), 0),
            **explain_kwargs,
        )  # noise keyed by source index: one image, one map, whatever batch or resume
        masks = getattr(batch, "masks", None)
        summary = stats_lib.summarize(
            explanation.maps[:, 0],
            explanation.low_res[:, 0],
            explanation.probabilities,
            explanation.targets[:, 0],
            np.asarray(batch.boxes, np.float32),
            None if masks is None else np.asarray(masks, bool),
            threshold,
            top_k=k,
            border=float(border),
            corner=float(corner),
            with_masks=masks is not None,
            box_resolution=manifest["box_resolution"],
            box_rule=manifest.get("box_rule", "paper"),
        )
        for leaf in jax.tree_util.tree_leaves(summary):
            leaf.copy_to_host_async()
        return summary

    def collect(batch, summary) -> int:
        nonlocal low_res_shape
        host = jax.device_get(summary)
        if low_res_shape is None:
            low_res_shape = list(host["low_res"].shape[1:])
            if process == 0 and manifest.get("low_res_shape") != low_res_shape:
                manifest["low_res_shape"] = low_res_shape
                store.write_json(
                    out_dir / store.MANIFEST, {**store.read_manifest(out_dir), "low_res_shape": low_res_shape}
                )
        writer.put(_BatchMeta.of(batch), host, list(batch.errors))
        return int(np.sum(np.asarray(batch.indices) >= 0))

    pending = None
    try:
        with tqdm(
            total=len(remaining), desc=f"audit ({manifest['method']})", unit="img", disable=not progress, smoothing=0.1
        ) as bar:

            def finish(previous) -> None:
                # collect the batch dispatched one step earlier (the device runs ahead of the host)
                nonlocal processed
                count = collect(*previous)
                processed += count
                bar.update(count)
                if on_batch is not None:
                    on_batch(processed)

            for batch in batches:
                summary = dispatch(batch)
                if pending is not None:
                    finish(pending)
                pending = (batch, summary)
            if pending is not None:
                finish(pending)
    except BaseException:
        # Keep the rows already fetched (the writer flushes them) but let this error through.
        batches.close()
        writer.close(raise_error=False)
        raise
    batches.close()
    writer.close()  # raises the writer's failure (e.g. the last part did not fit on the disk)
    return processed
