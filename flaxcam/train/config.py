"""What defines a training run (:class:`TrainConfig`, saved as ``config.json``) and the optimizer it
builds (:func:`make_optimizer`); the keys of removed options that a saved config may still hold."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import optax

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
