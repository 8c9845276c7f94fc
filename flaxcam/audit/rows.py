"""The audit's rows: one batch's results as NumPy columns (valid images only; boxes from the foreground
masks, scaled to input pixels) and such columns as an Arrow table of :data:`flaxcam.audit.store.SCHEMA`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxcam._optional import require
from flaxcam.audit import stats as stats_lib
from flaxcam.audit import store

if TYPE_CHECKING:
    import pyarrow as pa
else:
    pa = require("pyarrow", extra="audit")


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
