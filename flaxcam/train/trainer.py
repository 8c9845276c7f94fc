"""Training GAP- or GMP-head classifiers with optax: small pure functions around one jitted step.

Two entry points:

* :func:`train` — the full trainer: any flaxcam data source (through :mod:`flaxcam.data`'s
  ``iterate_batches``) or in-memory arrays (:class:`ArrayFeed`), AdamW with a warmup + cosine schedule,
  on-device augmentation (random horizontal flips and shifts), per-epoch evaluation, orbax checkpoints
  every ``checkpoint_every`` steps and at each epoch's end, **resume after an interruption**, a progress
  bar, and a final model bundle (:func:`flaxcam.models.save_bundle`) that ``flaxcam explain --weights``
  loads as it is. The ``flaxcam train`` command calls it.
* :func:`fit` — the minimal in-memory loop the digits demo uses (no checkpoints).

Determinism, which is what makes resuming exact: the example order of epoch ``e`` is
``numpy.random.default_rng([seed, e]).permutation(n)`` cut into full batches (the ragged tail is
dropped, so every step has one shape), and the augmentation of step ``s`` is drawn from
``numpy.random.default_rng([seed, s, 7])`` (:func:`augmentation_draws`). Both are functions of the step alone, so a run restored from the
checkpoint of step ``s`` continues with exactly the batches and augmentations the uninterrupted run
would have used (tested: the final parameters are equal).

Several processes (``jax.distributed.initialize`` before, e.g. ``flaxcam train ... --coordinator HOST:PORT
--num-processes N --process-id I``): data-parallel training over a global mesh of every process's
devices. Each global batch of ``batch_size`` examples is the one a single process would use; each
process reads only its own slice of it (:class:`DataParallel`) and feeds it to its devices
(``jax.make_array_from_process_local_data``). The step is one ``jit`` with shardings: parameters and
optimizer state replicated, the batch split over the mesh's ``data`` axis, so XLA averages the
gradients over every device of every process (no host-side all-reduce). Process 0 alone writes
``config.json``, the checkpoints, ``history.json``, ``errors.json`` and the bundle; every process reads the
checkpoint to resume. Tested with 2 processes on one machine: the same parameters as one process with
the same global batch (float tolerance), and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

Array = jax.Array

__all__ = [
    "ArrayFeed",
    "DataParallel",
    "SourceFeed",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "accuracy",
    "augment",
    "augmentation_draws",
    "create_train_state",
    "epoch_order",
    "evaluate",
    "fit",
    "make_optimizer",
    "softmax_loss",
    "train",
    "train_step",
    "variables_of",
]


class TrainState(NamedTuple):
    """Parameters, other variable collections (e.g. ``batch_stats``), optimizer state and step."""

    params: Any
    extra: Any
    opt_state: Any
    step: Array


def create_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int | Array = 0
) -> TrainState:
    """Initialise the model on zeros of ``input_shape`` and the optimizer on its parameters.

    ``seed`` is an int or a PRNG key. :func:`train` jits this with an ``impl="rbg"`` key (XLA's
    RngBitGenerator compiles much faster than threefry on CPU).
    """
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    variables = model.init(key, jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    extra = {name: value for name, value in variables.items() if name != "params"}
    return TrainState(params, extra, optimizer.init(params), jnp.zeros((), jnp.int32))


def variables_of(state: TrainState) -> dict[str, Any]:
    """The variables dict ``model.apply`` and :func:`flaxcam.explain` take."""
    return {"params": state.params, **state.extra}


def _has_train_kwarg(model: nn.Module) -> bool:
    import inspect

    return "train" in inspect.signature(type(model).__call__).parameters


def softmax_loss(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy per example: ``-log softmax(z)_y``, ``(B,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    images: Array,
    labels: Array,
    weights: Array | None = None,
) -> tuple[TrainState, Array]:
    """One step of softmax cross-entropy (:func:`softmax_loss`); returns the new state and the batch loss.

    ``weights`` ``(B,)`` (1 for a usable example, 0 for padding or an unreadable image) gives the loss
    ``sum(w * loss) / max(sum(w), 1)``; default all ones.
    """
    mutable = list(state.extra)
    kwargs = {"train": True} if _has_train_kwarg(model) else {}
    if weights is None:
        weights = jnp.ones(labels.shape, jnp.float32)

    def loss_fn(params):
        variables = {"params": params, **state.extra}
        if mutable:
            logits, updates = model.apply(variables, images, mutable=mutable, **kwargs)
        else:
            logits, updates = model.apply(variables, images, **kwargs), {}
        per_example = softmax_loss(logits, jnp.maximum(labels, 0))
        return (weights * per_example).sum() / jnp.maximum(weights.sum(), 1.0), updates

    (value, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    changes, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, changes)
    extra = {**state.extra, **updates}
    return TrainState(params, extra, opt_state, state.step + 1), value


def eval_step(model: nn.Module, variables: Any, images: Array) -> Array:
    """Logits in inference mode."""
    return cast(Array, model.apply(variables, images))  # no mutable collections: the output alone


def augmentation_draws(seed: int, step: int, batch: int, *, flip: bool, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """The random choices of step ``step``'s augmentation, drawn on the host from ``(seed, step)`` alone:
    ``flips`` ``(B,)`` bool (each with probability 1/2 when ``flip``) and ``offsets`` ``(B, 2)`` int32,
    uniform in ``[0, 2 * shift]`` (row, column). A function of the step, so a resumed run replays them."""
    rng = np.random.default_rng([seed, step, 7])
    flips = rng.random(batch) < 0.5 if flip else np.zeros(batch, bool)
    offsets = (
        rng.integers(0, 2 * shift + 1, (batch, 2)).astype(np.int32) if shift > 0 else np.zeros((batch, 2), np.int32)
    )
    return flips, offsets


def augment(images: Array, flips: Array, offsets: Array, shift: int) -> Array:
    """On-device augmentation of a batch ``(B, H, W, C)``: horizontal flips and translations.

    Image ``i`` is flipped left-right where ``flips[i]``, then translated by ``offsets[i] - shift`` pixels
    (row, column; offsets in ``[0, 2 * shift]``): a crop of the image padded by ``shift`` pixels that
    repeat its edge. Jittable (``shift`` static); the random choices come from :func:`augmentation_draws`
    (on the host, so the compiled step holds no random-number generator).
    """
    _batch, height, width, channels = images.shape
    images = jnp.where(jnp.asarray(flips)[:, None, None, None], images[:, :, ::-1, :], images)
    if shift <= 0:
        return images
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, jnp.asarray(offsets, jnp.int32))


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``count`` examples: a permutation seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(count)


# Keys of TrainConfig options that were removed (Hide-and-Seek, the one-vs-rest loss: localization
# probes that did not help, see experiments/README.md), each with the value that meant "off". A saved
# config or a JSON file that has one at that value is read as if it did not have it; at another value it
# is refused (the option no longer exists). ``hide_probability`` mattered only with ``hide_patch``.
_RETIRED_OFF: dict[str, Any] = {"hide_patch": 0, "loss": "softmax"}


def _without_retired_off(values: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(values)
    for key, off in _RETIRED_OFF.items():
        if key in values and values[key] == off:
            del values[key]
    values.pop("hide_probability", None)  # meant nothing without hide_patch, which decides on its own
    return values


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` next to the checkpoints).

    Attributes:
        model: a key of :data:`flaxcam.models.MODELS` (``small_cnn``, ``resnet18``, ...).
        model_kwargs: constructor arguments, e.g. ``{"features": [16, 32, 64, 128], "downsamplings": 2}``;
            ``num_classes`` is set from the data's class names.
        pooling: the global pooling before the classifier, ``"avg"`` (GAP) or ``"max"`` (GMP).
        input_size: model input ``(H, W)``; images are resized to it.
        mean, std: input normalization ``(x - mean) / std`` of [0, 1] images.
        epochs, batch_size: full batches only (the ragged tail of each epoch is dropped).
        learning_rate, weight_decay, warmup_fraction: AdamW with a linear warmup over that fraction of
            the steps, then cosine decay to 0.
        flip, shift: augmentation (:func:`augment`).
        checkpoint_every: save a checkpoint every that many steps (0: only at the end of each epoch;
            a checkpoint is always written at each epoch's end).
        keep_checkpoints: how many recent checkpoints to keep.
        seed: parameter initialisation, data order and augmentation.
    """

    model: str = "small_cnn"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pooling: str = "avg"
    input_size: tuple[int, int] = (64, 64)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    flip: bool = False
    shift: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate the values and normalize sequences to tuples."""
        from flaxcam.models import MODELS, POOLINGS

        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: valid names are {', '.join(sorted(MODELS))}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}: valid options are {', '.join(POOLINGS)}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.shift < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every and shift must be >= 0 and keep_checkpoints >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        if len(self.input_size) != 2 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("input_size must be (H, W); mean and std must have 3 values (RGB)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a JSON config); unknown keys raise an error naming the valid ones.
        Keys of options removed since (Hide-and-Seek, the one-vs-rest loss) are accepted at their "off"
        value and refused at any other."""
        values = _without_retired_off(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}: valid keys are {', '.join(sorted(names))}")
        return cls(**values)

    def build_model(self, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        """``(model, model_kwargs)`` for ``num_classes``; the kwargs are what the bundle stores."""
        from flaxcam.models import create_model

        kwargs = {**self.model_kwargs, "num_classes": int(num_classes), "pooling": self.pooling}
        kwargs = json.loads(json.dumps(kwargs))  # JSON-like, as a bundle stores them
        return create_model(self.model, **kwargs), kwargs


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with a linear warmup over ``warmup_fraction`` of ``total_steps`` then cosine decay to 0."""
    warmup = int(config.warmup_fraction * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup else config.learning_rate, config.learning_rate, warmup, max(total_steps, warmup + 1), 0.0
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------------- data feeds


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


# --------------------------------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, variables: Any, feed: Feed, *, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over a feed (padding and unreadable rows excluded).

    Returns ``{"accuracy", "loss", "count"}``; one compiled shape (the last batch is padded).
    """
    return _evaluate_with(_eval_fn(model), variables, feed, batch_size)


def _eval_fn(model: nn.Module) -> Callable:
    return jax.jit(_eval_function(model))


def _eval_function(model: nn.Module) -> Callable:
    def step(variables, inputs, labels, weights):
        logits = eval_step(model, variables, inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return (weights * hit).sum(), (weights * ce).sum(), weights.sum()

    return step


# --------------------------------------------------------------------------------------------- processes


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


# --------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(directory: Path, keep: int, placement: DataParallel | None = None):
    """The run's orbax checkpoint manager. With several processes, process 0's writes (orbax commits a
    checkpoint by renaming its temporary folder) and every other process's only reads; each acts
    alone (``active_processes``), so saving needs no other process. The folder must exist then."""
    import orbax.checkpoint as ocp

    if placement is None or not placement.parallel:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        return ocp.CheckpointManager(directory.absolute(), options=options)
    alone = ocp.options.MultiprocessingOptions(primary_host=placement.process, active_processes={placement.process})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if placement.writer else None,
        create=False,
        read_only=not placement.writer,
        enable_async_checkpointing=False,
        multiprocessing_options=alone,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _save(manager, state: TrainState, placement: DataParallel | None = None) -> None:
    import orbax.checkpoint as ocp

    parallel = placement is not None and placement.parallel
    if placement is not None and parallel and not placement.writer:
        return
    step = int(state.step)
    if step in manager.all_steps():
        return
    # several processes: the replicated state copied to the host (each process holds all of it)
    saved = jax.device_get(state._asdict()) if parallel else state._asdict()
    manager.save(step, args=ocp.args.StandardSave(saved), force=True)
    manager.wait_until_finished()


def _restore(manager, state: TrainState, placement: DataParallel | None = None) -> TrainState:
    import orbax.checkpoint as ocp

    if placement is not None and placement.parallel:
        target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state._asdict())  # restored as NumPy
        host = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
        return TrainState(**placement.replicate(jax.device_get(host)))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._asdict())
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    return TrainState(**restored)


# --------------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and variables, the bundle path and the history."""

    model: nn.Module
    variables: dict[str, Any]
    bundle: Path
    history: list[dict[str, Any]]
    steps: int
    resumed_from: int | None
    errors: list[tuple[int, str, str]]
    complete: bool = True
    """False when the run stopped early (``stop_after_step``): no bundle was written."""


_COMPILED: dict[tuple, tuple] = {}


def _run_functions(
    config: TrainConfig, num_classes: int, total_steps: int, placement: DataParallel | None = None
) -> tuple:
    """``(model, model_kwargs, optimizer, init, step, evaluate)`` for a run, the jitted functions reused
    by later runs with the same definition (a resumed run in the same process does not recompile).
    Several processes (``placement.parallel``): jitted with shardings over the global mesh (state
    replicated, batches split), so the gradients are averaged over every device by XLA."""
    mesh = placement.mesh if placement is not None else None
    key = (json.dumps(config.to_dict(), sort_keys=True), num_classes, total_steps, mesh)
    if key not in _COMPILED:
        model, model_kwargs = config.build_model(num_classes)
        optimizer = make_optimizer(config, total_steps)

        def initial(rng):
            return create_train_state(model, optimizer, (1, *config.input_size, 3), rng)

        if placement is not None and placement.parallel:
            rep, data = placement.replicated, placement.data
            init = jax.jit(initial, out_shardings=rep)
            step = jax.jit(
                _step_function(model, optimizer, config), in_shardings=(rep,) + (data,) * 5, out_shardings=(rep, rep)
            )
            evaluate_fn = jax.jit(_eval_function(model), in_shardings=(rep, data, data, data), out_shardings=rep)
        else:
            init = jax.jit(initial)
            step = jax.jit(_step_function(model, optimizer, config))
            evaluate_fn = jax.jit(_eval_function(model))
        if len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = (model, model_kwargs, optimizer, init, step, evaluate_fn)
    return _COMPILED[key]


def _step_function(model: nn.Module, optimizer: optax.GradientTransformation, config: TrainConfig) -> Callable:
    def step(state, inputs, labels, weights, flips, offsets):
        inputs = augment(inputs, flips, offsets, config.shift)
        return train_step(model, optimizer, state, inputs, labels, weights)

    return step


def _check_resume_config(out: Path, config: TrainConfig, resume: bool, write: bool = True) -> None:
    """Refuse to resume a run of another config in ``out``; then (``write``) save this config there.
    With several processes every process checks (the same files, so the same outcome) and process 0
    writes."""
    path = out / "config.json"
    if path.exists() and resume:
        # Keys added to TrainConfig after a run was saved take their defaults (an old run stays resumable).
        # Keys of options removed since are dropped where the run had them off (``_RETIRED_OFF``).
        saved = {**TrainConfig().to_dict(), **_without_retired_off(json.loads(path.read_text()))}
        if saved != config.to_dict():
            changed = sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k))
            raise ValueError(
                f"{out} holds a run with a different config (differs in {changed}); resume it with the same "
                f"config, pass resume=False (--restart) to start over, or choose another output folder"
            )
    if write:
        from flaxcam.files import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(config.to_dict(), indent=2))


def train(
    config: TrainConfig,
    train_data: Any,
    *,
    out: str | Path,
    eval_data: Any = None,
    resume: bool = True,
    progress: bool = True,
    worker_count: int = 0,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``config.model`` on ``train_data`` and write checkpoints, history and a model bundle to ``out``.

    Args:
        config: the run's definition (:class:`TrainConfig`).
        train_data, eval_data: an :class:`ArrayFeed`, a :mod:`flaxcam.data` image source, or a source spec
            such as ``"folder:PATH"``, ``"ham10000:PATH"``, ``"tfds:NAME:SPLIT"``, ``"npz:PATH"``.
        out: output folder: ``config.json``, ``checkpoints/`` (orbax), ``history.json`` (one entry per
            epoch: train loss, eval accuracy/loss), ``errors.json`` (unreadable training images) and
            ``model.msgpack`` (the final bundle, loadable by ``flaxcam explain --weights``).
        resume: continue from the latest checkpoint in ``out`` when there is one (the config must be
            the same); ``False`` starts over (old checkpoints are deleted).
        stop_after_step: stop (after checkpointing) once this global step is reached, as an
            interruption would; for tests and for splitting a long run into sessions.

    On ``KeyboardInterrupt`` the current state is checkpointed before the exception propagates, so
    rerunning the same call resumes where it stopped.
    """
    from flaxcam import distributed
    from flaxcam.files import atomic_write_text

    out = Path(out)
    placement = DataParallel(config.batch_size)  # several processes: checks the batch against the devices
    feed = _feed(train_data, config, worker_count)
    eval_feed = _feed(eval_data, config, worker_count)
    if placement.parallel:
        placement.check_same(
            {
                "config": config.to_dict(),
                "out": str(out),
                "training data": [_describe(train_data), len(feed), list(feed.class_names)],
                "evaluation data": None if eval_feed is None else [_describe(eval_data), len(eval_feed)],
                "resume": resume,
                "stop_after_step": stop_after_step,
            }
        )
        if not placement.writer:
            progress, log = False, _silent
    _check_resume_config(out, config, resume, write=placement.writer)
    steps_per_epoch = len(feed) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"need at least batch_size={config.batch_size} training examples, got {len(feed)}")
    total_steps = config.epochs * steps_per_epoch
    model, model_kwargs, _optimizer, init_fn, step_fn, evaluate_fn = _run_functions(
        config, len(feed.class_names), total_steps, placement
    )
    state = init_fn(jax.random.key(config.seed, impl="rbg"))

    if placement.writer:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    distributed.barrier("flaxcam-train-prepared")
    manager = _checkpoint_manager(out / "checkpoints", config.keep_checkpoints, placement)
    history_path = out / "history.json"
    history: list[dict[str, Any]] = []
    resumed_from = None
    if not resume:
        if placement.writer:
            for old in manager.all_steps():
                manager.delete(old)
        distributed.barrier("flaxcam-train-restart")
    elif manager.latest_step() is not None:
        state = _restore(manager, state, placement)
        resumed_from = int(state.step)
        if history_path.exists():
            history = [h for h in json.loads(history_path.read_text()) if h["step"] <= resumed_from]
        log(f"resuming from the checkpoint of step {resumed_from} in {out / 'checkpoints'}")

    start_step = step = int(state.step)
    interrupted = False
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=not progress)
    try:
        for epoch in range(start_step // steps_per_epoch, config.epochs):
            done = int(state.step) - epoch * steps_per_epoch
            order = epoch_order(len(feed), config.seed, epoch)[
                done * config.batch_size : steps_per_epoch * config.batch_size
            ]
            losses = []
            started = time.perf_counter()
            rows = slice(placement.start, placement.stop)  # this process's rows of each global batch
            local = placement.local_order(order, config.batch_size)
            for inputs, labels, weights in feed.batches(local, placement.stop - placement.start):
                drawn = config.batch_size if placement.parallel else len(labels)  # the global batch's draws
                flips, offsets = augmentation_draws(config.seed, step, drawn, flip=config.flip, shift=config.shift)
                batch = placement.global_batch(inputs, labels, weights, flips[rows], offsets[rows])
                state, loss = step_fn(state, *batch)
                losses.append(loss)
                step += 1  # a host-side counter: no device sync per step
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    _save(manager, state, placement)
                if stop_after_step is not None and step >= stop_after_step and step % steps_per_epoch:
                    interrupted = True  # mid-epoch; at an epoch's end, finish its evaluation first
                    break
            if interrupted:
                break
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": float(np.mean(jax.device_get(losses))) if losses else float("nan"),
                "seconds": round(time.perf_counter() - started, 2),
            }
            if eval_feed is not None:
                scores = _evaluate_with(evaluate_fn, variables_of(state), eval_feed, placement=placement)
                entry.update({f"eval_{k}": v for k, v in scores.items()})
            history.append(entry)
            _save(manager, state, placement)
            if placement.writer:
                atomic_write_text(history_path, json.dumps(history, indent=2))
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{entry['train_loss']:.3f}",
                **({"eval_acc": f"{entry['eval_accuracy']:.3f}"} if "eval_accuracy" in entry else {}),
            )
            if stop_after_step is not None and step >= stop_after_step and step < total_steps:
                interrupted = True
                break
    except KeyboardInterrupt:
        _save(manager, state, placement)
        log(f"interrupted: checkpoint of step {int(state.step)} saved in {out / 'checkpoints'}; rerun to resume")
        raise
    finally:
        bar.close()
    if interrupted:
        _save(manager, state, placement)
    # every process's unreadable images (each read only its own slices)
    found = [list(e) for e in getattr(feed, "errors", {}).values()]
    errors = sorted({tuple(e) for part in distributed.allgather_json(found) for e in part})
    if errors and placement.writer:
        atomic_write_text(out / "errors.json", json.dumps([list(e) for e in errors], indent=2))
        log(f"{len(errors)} training image(s) could not be used; listed in {out / 'errors.json'}")
    variables = jax.device_get(variables_of(state))
    bundle = out / "model.msgpack"
    if not interrupted and placement.writer:
        from flaxcam.models import save_bundle

        meta = {
            "input_size": list(config.input_size),
            "mean": list(config.mean),
            "std": list(config.std),
            "class_names": list(feed.class_names),
            "pooling": config.pooling,
            "steps": int(state.step),
            "history": history[-1:] if history else [],
        }
        save_bundle(bundle, model_name=config.model, model_kwargs=model_kwargs, variables=variables, meta=meta)
    manager.close()
    distributed.barrier("flaxcam-train-end")  # every process returns once process 0 has written
    return TrainResult(model, variables, bundle, history, int(state.step), resumed_from, errors, not interrupted)


def _without_padding(batch: tuple[np.ndarray, np.ndarray, np.ndarray], rows: np.ndarray) -> tuple:
    """A batch whose padding rows (order ``-1``) get weight 0."""
    inputs, labels, weights = batch
    return inputs, labels, np.where(rows >= 0, weights, 0.0).astype(np.float32)


def _silent(_message: str) -> None:
    """The log of processes other than 0 (process 0 speaks for the run)."""


def _describe(data: Any) -> str:
    """What identifies training data across processes: a spec as given, else its type."""
    return str(data) if isinstance(data, (str, Path)) else type(data).__name__


def _evaluate_with(
    step: Callable, variables: Any, feed: Feed, batch_size: int = 256, placement: DataParallel | None = None
) -> dict[str, float]:
    order = np.arange(len(feed))
    batches: Iterator[tuple[Any, ...]]
    if placement is not None and placement.parallel:
        devices = len(jax.devices())
        batch_size = -(-batch_size // devices) * devices  # a multiple of the device count
        padded = -(-len(order) // batch_size) * batch_size
        order = np.concatenate([order, np.full(padded - len(order), -1)])  # -1: padding, weight 0
        start, stop = placement.rows(batch_size)
        batches = (
            placement.global_batch(*_without_padding(batch, rows))
            for batch, rows in zip(
                feed.batches(np.maximum(placement.local_order(order, batch_size), 0), stop - start),
                placement.local_order(order, batch_size).reshape(-1, stop - start),
                strict=True,
            )
        )
    else:
        batches = feed.batches(order, batch_size)
    correct = total_loss = count = 0.0
    for inputs, labels, weights in batches:
        c, loss, n = jax.device_get(step(variables, inputs, labels, weights))
        correct, total_loss, count = correct + c, total_loss + loss, count + n
    return {"accuracy": float(correct / max(count, 1)), "loss": float(total_loss / max(count, 1)), "count": int(count)}


# --------------------------------------------------------------------------------------------- minimal loop


def _batches(count: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(count)
    for start in range(0, count - batch_size + 1, batch_size):  # drop the ragged tail: one shape only
        yield order[start : start + batch_size]


def fit(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    preprocess: Callable[[Array], Array] = lambda x: x,
    progress: bool = True,
) -> tuple[dict[str, Any], list[float]]:
    """Train ``model`` on in-memory arrays with Adam; returns ``(variables, per_epoch_mean_loss)``."""
    if len(images) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} training images, got {len(images)}")
    steps = epochs * (len(images) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    state = create_train_state(model, optimizer, (1, *images.shape[1:]), seed)
    step = jax.jit(lambda s, x, y: train_step(model, optimizer, s, preprocess(x), y))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    with tqdm(total=steps, desc="training", disable=not progress, unit="step") as bar:
        for epoch in range(epochs):
            epoch_losses = []
            for index in _batches(len(images), batch_size, rng):
                state, loss = step(state, images[index], labels[index])
                epoch_losses.append(loss)
                if progress:  # keep the bar honest: without this, async dispatch makes it run ahead
                    loss.block_until_ready()
                bar.update(1)
            losses.append(float(np.mean(jax.device_get(epoch_losses))))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
    return variables_of(state), losses


def accuracy(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 256,
    preprocess: Callable[[Array], Array] = lambda x: x,
) -> float:
    """Top-1 accuracy over in-memory arrays (the last batch padded, so one compiled shape)."""
    predict = jax.jit(lambda v, x: jnp.argmax(eval_step(model, v, preprocess(x)), axis=-1))
    correct = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * (chunk.ndim - 1))
        predicted = np.asarray(predict(variables, padded))[: len(chunk)]
        correct += int((predicted == labels[start : start + batch_size]).sum())
    return correct / len(images)
