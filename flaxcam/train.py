"""Training GAP-head classifiers with optax: small pure functions around one jitted step.

This is the minimal loop the demo needs (arrays in memory, Adam, random flips off by default since
digits are not flip-invariant); it is written so that the full trainer (data sources, augmentation,
checkpoints, resume) can grow around ``train_step`` / ``eval_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

Array = jax.Array


class TrainState(NamedTuple):
    """Parameters, other variable collections (e.g. ``batch_stats``), optimizer state and step."""

    params: Any
    extra: Any
    opt_state: Any
    step: Array


def create_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int = 0
) -> TrainState:
    """Initialise the model on zeros of ``input_shape`` and the optimizer on its parameters."""
    variables = model.init(jax.random.key(seed), jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    extra = {key: value for key, value in variables.items() if key != "params"}
    return TrainState(params, extra, optimizer.init(params), jnp.zeros((), jnp.int32))


def variables_of(state: TrainState) -> dict[str, Any]:
    """The variables dict ``model.apply`` and :func:`flaxcam.explain` take."""
    return {"params": state.params, **state.extra}


def _has_train_kwarg(model: nn.Module) -> bool:
    import inspect

    return "train" in inspect.signature(type(model).__call__).parameters


def train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, state: TrainState, images: Array, labels: Array
) -> tuple[TrainState, Array]:
    """One step of softmax cross-entropy; returns the new state and the batch loss."""
    mutable = list(state.extra)
    kwargs = {"train": True} if _has_train_kwarg(model) else {}

    def loss_fn(params):
        variables = {"params": params, **state.extra}
        if mutable:
            logits, updates = model.apply(variables, images, mutable=mutable, **kwargs)
        else:
            logits, updates = model.apply(variables, images, **kwargs), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    changes, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, changes)
    extra = {**state.extra, **updates}
    return TrainState(params, extra, opt_state, state.step + 1), loss


def eval_step(model: nn.Module, variables: Any, images: Array) -> Array:
    """Logits in inference mode."""
    return model.apply(variables, images)


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
