"""What the trainer reads: a :class:`Feed` of model inputs, labels and weights in a given order, from
in-memory arrays (:class:`ArrayFeed`) or a :mod:`flaxcam.data` image source (:class:`SourceFeed`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from flaxcam.train.config import TrainConfig


class Feed(Protocol):
    """What the trainer reads: ``len(feed)`` examples, ``class_names``, and batches in a given order."""

    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(inputs (B, H, W, 3) float32, labels (B,) int32, weights (B,) float32)`` for ``order``
        cut into batches of ``batch_size`` (the last one padded with weight-0 rows)."""
        ...


@dataclasses.dataclass
class ArrayFeed:
    """In-memory model inputs (already preprocessed) and labels; the fast path for small data."""

    inputs: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        """Check shapes."""
        self.inputs = np.asarray(self.inputs, np.float32)
        self.labels = np.asarray(self.labels, np.int32)
        if self.inputs.ndim != 4 or len(self.inputs) != len(self.labels):
            raise ValueError(
                f"inputs must be (N, H, W, C) with N labels, got {self.inputs.shape} and {self.labels.shape}"
            )
        self.class_names = tuple(self.class_names)

    @classmethod
    def from_images(
        cls, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], config: TrainConfig
    ) -> ArrayFeed:
        """``images`` in [0, 1] (float) or uint8 at ``config.input_size``, normalized with the config's mean/std."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        if images.shape[1:3] != tuple(config.input_size):
            raise ValueError(f"images are {images.shape[1:3]} but the config's input_size is {config.input_size}")
        inputs = (images - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
        return cls(inputs.astype(np.float32), labels, tuple(class_names))

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, len(order), batch_size):
            rows = np.asarray(order[start : start + batch_size])
            pad = batch_size - len(rows)
            weights = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
            rows = np.concatenate([rows, np.zeros(pad, rows.dtype)]) if pad else rows
            labels = self.labels[rows]
            yield self.inputs[rows], labels, weights * (labels >= 0)


class SourceFeed:
    """A :mod:`flaxcam.data` image source read through ``iterate_batches`` (grain), for data of any size.

    ``indices`` restricts it to a subset of the source (e.g. a train/validation split); position ``i``
    of the feed is source record ``indices[i]``. Unreadable images and unknown labels get weight 0 and
    are recorded in :attr:`errors` (``(index, id, reason)``, source indices), never raised.
    """

    def __init__(
        self, source: Any, config: TrainConfig, *, indices: Sequence[int] | None = None, worker_count: int = 0
    ) -> None:
        from flaxcam.imageio import Preprocessing

        self.source = source
        self.class_names = tuple(source.class_names)
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
        self.preprocessing = Preprocessing(size=config.input_size, mean=config.mean, std=config.std)
        self.worker_count = worker_count
        self.errors: dict[int, tuple[int, str, str]] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from flaxcam.data import iterate_batches

        for batch in iterate_batches(
            self.source,
            self.preprocessing,
            batch_size,
            indices=self.indices[np.asarray(order)],
            worker_count=self.worker_count,
        ):
            for error in batch.errors:
                self.errors.setdefault(int(error[0]), cast(tuple[int, str, str], tuple(error)))
            labels = np.asarray(batch.labels, np.int32)
            weights = (np.asarray(batch.valid) & (labels >= 0)).astype(np.float32)
            yield np.asarray(batch.images, np.float32), labels, weights


def _feed(data: Any, config: TrainConfig, worker_count: int = 0) -> Feed:
    """An :class:`ArrayFeed`/:class:`SourceFeed` as is, a source spec string or an image source wrapped."""
    if data is None or hasattr(data, "batches"):
        return data
    if isinstance(data, (str, Path)):
        from flaxcam.data import open_source

        data = open_source(str(data))
    return SourceFeed(data, config, worker_count=worker_count)
