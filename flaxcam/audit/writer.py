"""The audit's writer thread: fetched batch results become rows (:mod:`flaxcam.audit.rows`), written
as Parquet parts atomically every ``rows_per_part`` rows; its failures are raised in the main thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flaxcam.audit import store
from flaxcam.audit.errors import AuditError
from flaxcam.audit.rows import _BatchMeta, _host_columns, _rows_to_table


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
