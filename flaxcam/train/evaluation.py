"""Top-1 accuracy and mean cross-entropy over a :class:`~flaxcam.train.feeds.Feed`, on one process or
over the global mesh of several (:class:`~flaxcam.train.parallel.DataParallel`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxcam.train.feeds import Feed
from flaxcam.train.parallel import DataParallel
from flaxcam.train.step import eval_step


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


def _without_padding(batch: tuple[np.ndarray, np.ndarray, np.ndarray], rows: np.ndarray) -> tuple:
    """A batch whose padding rows (order ``-1``) get weight 0."""
    inputs, labels, weights = batch
    return inputs, labels, np.where(rows >= 0, weights, 0.0).astype(np.float32)


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
