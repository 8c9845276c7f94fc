"""The pure pieces of one training step: the state, the loss, the jittable step, and the draws that
make a run deterministic (augmentation of step ``s``, example order of epoch ``e``)."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


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
