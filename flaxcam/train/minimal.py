"""The minimal in-memory loop the digits demo uses: :func:`fit` (Adam, no checkpoints) and
:func:`accuracy`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from flaxcam.train.step import create_train_state, eval_step, train_step, variables_of

Array = jax.Array


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
