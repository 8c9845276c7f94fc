"""A tiny stand-in for the agreed ``flaxcam.data`` interface (ArraySource + iterate_batches), used by the
audit tests only while the real data package is not on main. It follows docs' interface, not grain."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Record:
    index: int
    id: str
    image: np.ndarray | None
    label: int
    error: str | None = None
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None


class ArraySource:
    def __init__(self, images, labels=None, class_names=None, boxes=None, masks=None, ids=None, bad=()):
        self.images, self.labels, self.boxes = images, labels, boxes
        self.class_names = tuple(class_names or ())
        self.bad = set(bad)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        label = -1 if self.labels is None else int(self.labels[index])
        if index in self.bad:
            return Record(index, str(index), None, label, error="corrupt")
        box = None if self.boxes is None else tuple(float(v) for v in self.boxes[index])
        return Record(index, str(index), self.images[index], label, box=box)


@dataclasses.dataclass
class Batch:
    images: np.ndarray
    indices: np.ndarray
    ids: list
    labels: np.ndarray
    valid: np.ndarray
    boxes: np.ndarray
    errors: list


def iterate_batches(source, preprocessing, batch_size, *, indices=None, shard_index=0, shard_count=1,
                    worker_count=0, shuffle=False, seed=0, drop_remainder=False):
    order = np.arange(len(source)) if indices is None else np.asarray(indices)
    order = order[shard_index::shard_count]
    height, width = preprocessing.size
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = np.zeros((batch_size, height, width, 3), np.float32)
        idx = np.full(batch_size, -1, np.int64)
        ids = [""] * batch_size
        labels = np.full(batch_size, -1, np.int32)
        valid = np.zeros(batch_size, bool)
        boxes = np.full((batch_size, 4), np.nan, np.float32)
        errors = []
        for row, i in enumerate(chunk):
            record = source[int(i)]
            idx[row], ids[row], labels[row] = record.index, record.id, record.label
            if record.error is not None:
                errors.append((record.index, record.id, record.error))
                continue
            image = record.image
            _, normalized = preprocessing([image])
            images[row] = normalized[0]
            valid[row] = True
            if record.box is not None:
                sy, sx = height / image.shape[0], width / image.shape[1]
                y0, x0, y1, x1 = record.box
                boxes[row] = (y0 * sy, x0 * sx, y1 * sy, x1 * sx)
        yield Batch(images, idx, ids, labels, valid, boxes, errors)


def install() -> None:
    """Make ``flaxcam.data.iterate_batches`` available if the real one is missing."""
    import flaxcam.data

    if not hasattr(flaxcam.data, "iterate_batches"):
        flaxcam.data.iterate_batches = iterate_batches
