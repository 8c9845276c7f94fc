"""Data-parallel training over processes: where a run's arrays live and which rows of each global
batch this process reads (:class:`DataParallel`)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class DataParallel:
    """Where a run's arrays live: the default device of a single process, or, with several processes
    (``jax.process_count() > 1``), a global mesh over every device of every process with one axis,
    ``data``.

    With several processes each global batch of ``batch_size`` rows is split over the mesh's devices;
    this process reads only the rows its own devices hold (:meth:`local_order`, a contiguous slice
    ``[start, stop)`` of every batch) and :meth:`global_batch` assembles the global arrays from them.
    The training state is replicated. ``batch_size`` must be a multiple of the number of devices.
    """

    AXIS = "data"

    def __init__(self, batch_size: int) -> None:
        self.process, self.process_count = jax.process_index(), jax.process_count()
        self.batch_size = int(batch_size)
        self.start, self.stop = 0, self.batch_size
        self.mesh = None
        if self.process_count == 1:
            return
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices()
        if self.batch_size % len(devices):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of the {len(devices)} devices of the "
                f"{self.process_count} processes (each device takes an equal part of every batch)"
            )
        self.mesh = Mesh(np.asarray(devices), (self.AXIS,))
        self.data = NamedSharding(self.mesh, PartitionSpec(self.AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.start, self.stop = self.rows(self.batch_size)

    @property
    def parallel(self) -> bool:
        """Whether the run spans several processes (a global mesh)."""
        return self.mesh is not None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (process 0)."""
        return self.process == 0

    def rows(self, batch_size: int) -> tuple[int, int]:
        """``[start, stop)``: the rows of a global batch of ``batch_size`` this process's devices hold."""
        if self.mesh is None:
            return 0, batch_size
        slices = self.data.addressable_devices_indices_map((batch_size,)).values()
        starts = sorted((part[0].start or 0, part[0].stop or batch_size) for part in slices if part is not None)
        if any(a[1] != b[0] for a, b in itertools.pairwise(starts)):
            raise ValueError("this process's devices do not hold one contiguous slice of the batch")
        return starts[0][0], starts[-1][1]

    def local_order(self, order: np.ndarray, batch_size: int) -> np.ndarray:
        """This process's examples of ``order`` (full global batches of ``batch_size``), batch by batch."""
        if self.mesh is None:
            return order
        start, stop = self.rows(batch_size)
        return np.asarray(order).reshape(-1, batch_size)[:, start:stop].reshape(-1)

    def global_batch(self, *arrays: Any) -> tuple[Any, ...]:
        """Global arrays split over ``data`` from this process's slices (as they are with one process)."""
        if self.mesh is None:
            return arrays
        return tuple(jax.make_array_from_process_local_data(self.data, np.asarray(a)) for a in arrays)

    def replicate(self, tree: Any) -> Any:
        """Host values (the same in every process) as arrays replicated over the mesh."""
        if self.mesh is None:
            return tree
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), self.replicated, lambda index: np.asarray(x)[index]),
            tree,
        )

    def check_same(self, settings: Mapping[str, Any]) -> None:
        """Refuse in every process (``ValueError``) unless all run with the same ``settings``."""
        from flaxcam import distributed

        differing = distributed.differing_processes(dict(settings))
        if differing:
            raise ValueError(
                f"process(es) {', '.join(map(str, differing))} of this run have other settings than process 0 "
                f"({', '.join(sorted(settings))}): start every process with the same command"
            )
