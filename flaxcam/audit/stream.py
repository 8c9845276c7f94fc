"""The audit's streaming loop: a thread reads and batches the source ahead (:class:`_Prefetcher`); the
main thread dispatches the jitted explain step and statistics of batch ``i`` (asynchronously) and then
fetches batch ``i - 1``'s results, which it hands to the writer thread (:mod:`flaxcam.audit.writer`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

import flaxcam
from flaxcam.audit import stats as stats_lib
from flaxcam.audit import store
from flaxcam.audit.manifest import settings_of
from flaxcam.audit.rows import _BatchMeta
from flaxcam.audit.writer import _PartWriter


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
