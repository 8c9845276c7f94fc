"""Activations and gradients at named layers of any Flax model (linen or NNX), with no edits to it.

A *layer* is any submodule whose ``__call__`` returns an array: for linen, its module path joined with
dots (``"layer4"``, ``"layer3.1.conv2"``, ``"Conv_0"``); for NNX, its attribute path (``"layer4"``,
``"blocks.3.conv"``). :mod:`flaxcam.capture` runs the model with a *tap* at the layer that records its
output ``A`` and returns ``A + delta`` for a zero ``delta``: ``d score / d delta`` at ``delta = 0`` is
``d score / d A``, and because parameters and inputs are closed over (never differentiated), JAX's
autodiff only transposes the operations *after* the layer: the backward pass costs the part of the
network between the layer and the output, nothing before it.

Every function here is pure (usable under ``jit``, ``vmap``, ``scan``) and returns a named result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from flaxcam import ops
from flaxcam.capture import (
    ATTENTION_TYPES,
    BiasLayer,
    LayerError,
    LayerInfo,
    as_model,
    is_nnx,
    layer_name,
    shape_key,
)

Array = jax.Array
OutputFn = Callable[[Any], Array]
ScoreFn = Callable[[Array], tuple[Array, Any]]

__all__ = [
    "AttentionProbe",
    "BiasLayer",
    "Diagonals",
    "HessianProbe",
    "InputGradients",
    "LayerError",
    "LayerInfo",
    "Probe",
    "bias_layers",
    "default_output_fn",
    "derivative_diagonals",
    "effective_bias",
    "forward_at_layer",
    "forward_at_layers",
    "input_and_layer_gradients",
    "layer_name",
    "list_layers",
    "probe",
    "probe_attention",
    "probe_hessian",
    "resolve_attention_blocks",
    "resolve_layer",
    "shape_key",
]


class Probe(NamedTuple):
    """Model output and what the methods read at the layer(s): ``activations`` ``(B, h, w, C)`` and
    ``gradients`` ``(B, T, h, w, C)`` of the ``(B, T)`` target ``scores`` (per-layer tuples when several
    layers are probed); ``chosen`` is what the score function returned beside the scores (the labels)."""

    logits: Array
    activations: Any
    gradients: Any
    scores: Array
    chosen: Any


class HessianProbe(NamedTuple):
    """:class:`Probe` plus ``hvps``: per layer, the Hessian of each target score times the activations."""

    logits: Array
    activations: tuple[Array, ...]
    gradients: tuple[Array, ...]
    hvps: tuple[Array, ...]
    scores: Array
    chosen: Any


class Diagonals(NamedTuple):
    """Per layer, the diagonals of the 2nd and 3rd derivatives of each target score ``(B, T, h, w, C)``."""

    second: tuple[Array, ...]
    third: tuple[Array, ...]


class AttentionProbe(NamedTuple):
    """What the attention methods read: per block, its attention probabilities ``(B, heads, N, N)`` and
    the gradients ``(B, T, heads, N, N)`` of that block's own target scores with respect to them."""

    logits: Array
    scores: Array
    chosen: Any
    attention: tuple[Array, ...]
    gradients: tuple[Array, ...]


class InputGradients(NamedTuple):
    """Target scores and their gradients w.r.t. the input ``(B, T, H, W, C)`` and each layer's output."""

    logits: Array
    scores: Array
    chosen: Any
    input_gradients: Array
    layer_gradients: tuple[Array, ...]


def list_layers(model: Any, variables: Any, images: Any = None, apply_kwargs: tuple = ()) -> list[LayerInfo]:
    """Every submodule called during a forward pass, in the order the calls *return*.

    ``list_layers(linen_model, variables, images)`` or ``list_layers(nnx_model, images)`` (the NNX
    model's own state is used). ``variables`` may also be its :func:`shape_key`. Runs on shapes only
    (``jax.eval_shape``): no computation. Modules whose output is not a single array are listed with
    shape ``()``. A module called several times is listed once per call.
    """
    if images is None:
        if not is_nnx(model):
            raise TypeError(
                "list_layers(model, variables, images) for a linen model; list_layers(model, images) for NNX"
            )
        from flax import nnx

        variables, images = nnx.state(model), variables
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    return list(as_model(model, apply_kwargs).list_layers(shape_key(variables), spec))


def _format_names(layers: list[LayerInfo], spatial_only: bool) -> str:
    names = [f"{info.name} {info.shape}" for info in layers if info.is_spatial or not spatial_only]
    return ", ".join(dict.fromkeys(names))


def resolve_layer(layers: list[LayerInfo], name: str | None, spatial_only: bool = True) -> LayerInfo:
    """Find ``name`` among ``layers`` (default: the last spatial layer to return); clear errors otherwise.
    ``spatial_only=False`` accepts any array output (e.g. ViT tokens, turned into a grid by a reshape)."""
    spatial = [info for info in layers if info.is_spatial]
    if name is None:
        if not spatial:
            raise LayerError(
                "the model has no submodule with a (batch, height, width, channels) output to explain; "
                f"its layers are: {_format_names(layers, spatial_only=False)}"
            )
        return spatial[-1]
    matches = [info for info in layers if info.name == name]
    if not matches:
        raise LayerError(
            f"unknown layer {name!r}. Layers with spatial outputs (usable targets): "
            f"{_format_names(layers, spatial_only=True)}"
            + ("" if spatial_only else f"; all layers: {_format_names(layers, spatial_only=False)}")
        )
    if len(matches) > 1:
        raise LayerError(
            f"layer {name!r} is called {len(matches)} times in one forward pass; pick a module called once"
        )
    info = matches[0]
    if spatial_only and not info.is_spatial:
        raise LayerError(
            f"layer {name!r} outputs shape {info.shape}, not (batch, height, width, channels). Layers with "
            f"spatial outputs: {_format_names(layers, spatial_only=True)}"
        )
    return info


def resolve_attention_blocks(
    layers: list[LayerInfo], names: list[str | None], method: str = "legrad"
) -> tuple[tuple[LayerInfo, ...], tuple[LayerInfo, ...]]:
    """The transformer blocks ``names`` (``[None]``: every block, in call order) and the attention
    probabilities layer of each, ``(blocks, attention)``.

    An attention layer is a submodule of a class in :data:`flaxcam.capture.ATTENTION_TYPES` with a
    ``(B, heads, N, N)`` output; its block is its shallowest enclosing layer that holds no other
    attention layer and returns ``(B, N, D)`` tokens (``blocks_0`` for ``blocks_0.attention.probabilities``
    of :class:`flaxcam.models.TinyViT`). Clear errors name the model's layers when it has no attention
    layer, and the blocks when a name is not one."""
    attention = [info for info in layers if info.is_attention]
    if not attention:
        raise LayerError(
            f"{method} reads the attention probabilities of a vision transformer's blocks (the output of a "
            f"submodule of class {' / '.join(ATTENTION_TYPES)}, as in flaxcam.models.TinyViT), and this model "
            f"computes none; its layers are: {_format_names(layers, spatial_only=False)}"
        )
    by_name = {info.name: info for info in layers}
    blocks: dict[str, tuple[LayerInfo, LayerInfo]] = {}
    for info in attention:
        parts = info.name.split(".")
        for depth in range(1, len(parts)):
            candidate = by_name.get(".".join(parts[:depth]))
            if candidate is None or len(candidate.shape) != 3 or candidate.shape[1] != info.shape[-1]:
                continue
            inside = [a for a in attention if a.name.startswith(candidate.name + ".")]
            if len(inside) == 1:
                blocks[candidate.name] = (candidate, info)
                break
    if not blocks:
        raise LayerError(
            f"{method}: no layer encloses exactly one attention layer and returns (batch, tokens, dim) tokens; "
            f"attention layers: {[info.name for info in attention]}"
        )
    requested = list(blocks) if names == [None] else names
    unknown = [name for name in requested if name not in blocks]
    if unknown:
        raise LayerError(
            f"{method} explains transformer blocks; {unknown} are not blocks with one attention layer. "
            f"Blocks of this model: {list(blocks)}"
        )
    if len(set(requested)) != len(requested):
        raise LayerError(f"{method}: a block is named twice in {requested}")
    chosen = [blocks[cast(str, name)] for name in requested]
    return tuple(block for block, _ in chosen), tuple(info for _, info in chosen)


def forward_at_layers(
    model: Any,
    variables: Any,
    images: Array,
    layers: tuple[str, ...],
    deltas: tuple[Array, ...] | None = None,
    apply_kwargs: tuple = (),
    record_inputs_of: str | None = None,
    replacements: tuple[Array | None, ...] | None = None,
) -> tuple[Any, tuple[Array, ...], Array | None]:
    """Run the model once, returning ``(output, activations at each layer, input of record module)``.

    When ``deltas`` are given, ``deltas[i]`` is added to the output of ``layers[i]`` before the rest of
    the network runs (the hook the gradient is taken through). ``record_inputs_of`` names a module whose
    first positional input is returned as the third element (used to check CAM's pooling → Dense head).
    ``replacements[i]`` (when not None) stands in for the output of ``layers[i]``: with activations
    computed once, a loop that evaluates only the network after the layer lets XLA drop the part
    before it as dead code.
    """
    return as_model(model, apply_kwargs).forward(
        variables, images, tuple(layers), deltas, record_inputs_of, replacements
    )


def forward_at_layer(
    model: Any,
    variables: Any,
    images: Array,
    layer: str,
    delta: Array | None = None,
    apply_kwargs: tuple = (),
    record_inputs_of: str | None = None,
) -> tuple[Any, Array, Array | None]:
    """:func:`forward_at_layers` for one layer: ``(output, activations, input of record module)``."""
    deltas = None if delta is None else (delta,)
    output, (activations,), head_input = forward_at_layers(
        model, variables, images, (layer,), deltas, apply_kwargs, record_inputs_of
    )
    return output, activations, head_input


def default_output_fn(output: Any) -> Array:
    """The model's output when it is a single array (logits, segmentation logits, an embedding)."""
    if not hasattr(output, "ndim"):
        raise ValueError(
            f"the model output is a {type(output).__name__}, not an array; pass output_fn= to select the "
            "scores to explain (e.g. output_fn=lambda out: out['logits'])"
        )
    return output


def _scores_of(model: Any, variables: Any, layers: tuple[str, ...], score_fn: ScoreFn, output_fn: OutputFn) -> Callable:
    """``scores_of(inputs, deltas, replacements=None) -> (scores (B, T), (logits, activations, aux))``:
    the target scores of ``inputs`` with ``deltas`` added at ``layers`` — the one function every
    derivative below differentiates."""

    def scores_of(inputs: Array, deltas: tuple[Array, ...] | None, replacements: tuple | None = None):
        output, activations, _ = model.forward(variables, inputs, layers, deltas, None, replacements)
        logits = output_fn(output)
        scores, aux = score_fn(logits)
        return scores, (logits, activations, aux)

    return scores_of


def _zero_deltas(model: Any, variables: Any, images: Array, layers: tuple[str, ...]) -> tuple[Array, ...]:
    shapes = jax.eval_shape(lambda v, x: model.forward(v, x, layers)[1], variables, images)
    return tuple(jnp.zeros(shape.shape, shape.dtype) for shape in shapes)


def _per_target_vjp(vjp_fn: Callable, scores: Array) -> Any:
    """Pull back the T one-hot cotangents of ``(B, T)`` scores; results get the target axis at 1.
    Images are independent (inference mode), so the gradient of ``scores[:, t].sum()`` holds every
    image's own gradient."""
    num_targets = scores.shape[1]
    # one-hot rows times ones_like(scores): the cotangents carry the scores' sharding (explicit meshes)
    cotangents = jnp.eye(num_targets, dtype=scores.dtype)[:, None, :] * jnp.ones_like(scores)[None]
    pulled = jax.vmap(vjp_fn)(cotangents)
    return jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 0, 1), pulled)


def probe(
    model: Any,
    variables: Any,
    images: Array,
    layers: str | tuple[str, ...],
    score_fn: ScoreFn,
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
    with_gradients: bool = True,
) -> Probe:
    """Logits, activations at ``layers`` and d(target scores)/d(activations), for a batch, from one
    forward pass.

    ``score_fn(logits) -> (scores, aux)`` returns the ``(batch, T)`` target scores (T targets per image)
    and anything else to return (e.g. the chosen class indices); the T targets are handled by ``vmap``
    over T cotangents of one linearization. Activations are ``(B, h, w, C)``, gradients
    ``(B, T, h, w, C)`` (``None`` when ``with_gradients`` is False) — or tuples of them, one per layer,
    when ``layers`` is a tuple.
    """
    model = as_model(model, apply_kwargs)
    single = isinstance(layers, str)
    names: tuple[str, ...] = (layers,) if isinstance(layers, str) else tuple(layers)
    scores_of = _scores_of(model, variables, names, score_fn, output_fn)

    def unwrap(values):
        return values[0] if single and values is not None else values

    if not with_gradients:
        scores, (logits, activations, aux) = scores_of(images, None)
        return Probe(logits, unwrap(activations), None, scores, aux)
    deltas = _zero_deltas(model, variables, images, names)
    scores, vjp_fn, (logits, activations, aux) = jax.vjp(lambda d: scores_of(images, d), deltas, has_aux=True)
    (gradients,) = _per_target_vjp(vjp_fn, scores)
    return Probe(logits, unwrap(activations), unwrap(tuple(gradients)), scores, aux)


def probe_attention(
    model: Any,
    variables: Any,
    images: Array,
    blocks: tuple[str, ...],
    attention: tuple[str, ...],
    score_fn: ScoreFn,
    block_scores: Callable[[Array, Any], Array],
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
) -> AttentionProbe:
    """For each block ``blocks[l]``, the gradient of *its own* target scores
    ``block_scores(tokens_l, chosen) -> (B, T)`` with respect to its attention probabilities
    ``attention[l]``, from one forward and one backward pass (per target).

    ``score_fn(logits) -> (scores, chosen)`` chooses the targets on the model output. The network goes
    on from each block with ``stop_gradient`` of its tokens, so the gradient of the sum of every block's
    scores reaches block ``l``'s attention only through block ``l``'s own scores (no path through later
    blocks), and the backward pass stays inside each block.
    """
    model = as_model(model, apply_kwargs)
    layers = (*blocks, *attention)
    count = len(blocks)
    replacements = (jax.lax.stop_gradient,) * count + (None,) * count
    _, captured, _ = jax.eval_shape(lambda v, x: model.forward(v, x, layers), variables, images)
    zeros = tuple(jnp.zeros(info.shape, info.dtype) for info in captured[count:])

    def scores_of(deltas: tuple[Array, ...]):
        output, values, _ = model.forward(variables, images, layers, (None,) * count + deltas, None, replacements)
        logits = output_fn(output)
        model_scores, chosen = score_fn(logits)
        chosen = jax.lax.stop_gradient(chosen)
        scores = sum(block_scores(tokens, chosen) for tokens in values[:count])
        return scores, (logits, model_scores, chosen, values[count:])

    scores, vjp_fn, (logits, model_scores, chosen, probabilities) = jax.vjp(scores_of, zeros, has_aux=True)
    (gradients,) = _per_target_vjp(vjp_fn, scores)
    return AttentionProbe(logits, model_scores, chosen, tuple(probabilities), tuple(gradients))


# ---------------------------------------------------------------------------------------------------
# Higher-order and whole-model derivatives (ShapleyCAM, exact Grad-CAM++, FullGrad)
# ---------------------------------------------------------------------------------------------------


def probe_hessian(
    model: Any,
    variables: Any,
    images: Array,
    layers: tuple[str, ...],
    score_fn: ScoreFn,
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
) -> HessianProbe:
    r"""Like :func:`probe`, plus the Hessian-vector product of each target score with the activations.

    For layer ``l`` with activations :math:`A` and target score :math:`s`:
    :math:`(H A)_i = \sum_j \frac{\partial^2 s}{\partial A_i \partial A_j} A_j` (the total second
    derivative: everything after the layer, other target layers included, depends on it). Computed
    forward-over-reverse, ``jax.jvp`` of the per-target gradient in the direction ``A``: one extra
    linearization per layer, no Hessian is materialized.
    """
    model = as_model(model, apply_kwargs)
    scores_of = _scores_of(model, variables, tuple(layers), score_fn, output_fn)
    zeros = _zero_deltas(model, variables, images, tuple(layers))
    scores, (logits, activations, aux) = scores_of(images, zeros)

    def gradients_of(deltas):
        values, vjp_fn, _ = jax.vjp(lambda d: scores_of(images, d), deltas, has_aux=True)
        return _per_target_vjp(vjp_fn, values)[0]  # per layer (B, T, h, w, C)

    gradients, hvps = [], []
    for index, layer_activations in enumerate(activations):
        direction = tuple(layer_activations if i == index else zeros[i] for i in range(len(layers)))
        layer_gradients, layer_hvps = jax.jvp(gradients_of, (zeros,), (direction,))
        gradients.append(layer_gradients[index])
        hvps.append(layer_hvps[index])
    return HessianProbe(logits, activations, tuple(gradients), tuple(hvps), scores, aux)


def derivative_diagonals(
    model: Any,
    variables: Any,
    images: Array,
    layers: tuple[str, ...],
    score_fn: ScoreFn,
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
    chunk_size: int = 32,
) -> Diagonals:
    r"""The diagonals of the second and third derivatives of each target score w.r.t. each layer's
    activations: :math:`\partial^2 s / \partial A_i^2` and :math:`\partial^3 s / \partial A_i^3` for
    every element ``i`` of ``A`` ``(h, w, C)``.

    Exact, by third-order forward mode: for each element ``i``, the three nested ``jax.jvp`` of
    :math:`t \mapsto s(A + t e_i)` at ``t = 0`` give both derivatives in one pass. There is no cheaper
    exact way to get a Hessian's diagonal for a general network, so the cost is **one pass per
    element of the layer**, ``n = h·w·C`` passes (e.g. 25 088 at a ResNet's ``layer4`` for a 224×224
    input), each a third-order jvp of the network after the layer (up to 8 streams of its forward
    computation, fewer where XLA merges the identical ones). Images are independent, so direction
    ``e_i`` is applied to every image at once and every target score comes out of the same pass: the
    count is per batch, not per image or target. The passes run on device, ``chunk_size`` directions at
    a time (:func:`flaxcam.ops.chunked_map`), so memory is bounded by ``chunk_size × batch`` tangent
    copies of the activations after the layer.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    model = as_model(model, apply_kwargs)
    layers = tuple(layers)
    scores_of = _scores_of(model, variables, layers, score_fn, output_fn)
    _, activations, _ = model.forward(variables, images, layers)
    seconds, thirds = [], []
    for index in range(len(layers)):
        # the layer's output is computed once, above; each pass evaluates the network after it
        replacements = tuple(a if i == index else None for i, a in enumerate(activations))

        def scores_at(delta: Array, index: int = index, replacements: tuple = replacements) -> Array:
            deltas = tuple(delta if i == index else jnp.zeros_like(a) for i, a in enumerate(activations))
            return scores_of(images, deltas, replacements)[0]  # (B, T)

        second, third = _diagonals_of(scores_at, activations[index], chunk_size)
        seconds.append(second)
        thirds.append(third)
    return Diagonals(tuple(seconds), tuple(thirds))


def _diagonals_of(scores_at: Callable[[Array], Array], activations: Array, chunk_size: int) -> tuple[Array, Array]:
    """Second and third derivatives ``(B, T, *element_shape)`` of ``scores_at(delta) -> (B, T)`` along
    each element of ``delta`` (the same element in every image), ``chunk_size`` elements at a time."""
    batch, *element_shape = activations.shape
    size = math.prod(element_shape)
    one = jnp.ones((), activations.dtype)

    def second_and_third(element: Array) -> tuple[Array, Array]:
        direction = jax.nn.one_hot(element, size, dtype=activations.dtype).reshape(element_shape)
        along = lambda t: scores_at(jnp.broadcast_to(t * direction, activations.shape))  # s(A + t e_i)
        first = lambda t: jax.jvp(along, (t,), (one,))[1]
        second = lambda t: jax.jvp(first, (t,), (one,))[1]
        return jax.jvp(second, (jnp.zeros((), activations.dtype),), (one,))  # (d²s/dt², d³s/dt³) at 0

    second, third = ops.chunked_map(jax.vmap(second_and_third), size, chunk_size)  # (n, B, T)

    def arrange(values: Array) -> Array:
        return jnp.moveaxis(values, 0, -1).reshape(batch, values.shape[-1], *element_shape)

    return arrange(second), arrange(third)


def bias_layers(
    model: Any, variables: Any, images: Array | jax.ShapeDtypeStruct, apply_kwargs: tuple = ()
) -> tuple[BiasLayer, ...]:
    """Every convolution and BatchNorm with a bias and a ``(B, h, w, C)`` output, in call order —
    pytorch-grad-cam's FullGrad takes every ``Conv2d`` / ``BatchNorm2d`` whose bias is not None.
    Shapes only (``jax.eval_shape``; ``variables`` may be its :func:`shape_key`); a module called more
    than once is an error (its gradient would mix the calls)."""
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    return as_model(model, apply_kwargs).bias_layers(shape_key(variables), spec)


def effective_bias(variables: Any, layer: BiasLayer, model: Any = None) -> Array:
    r"""The bias a layer adds to its output ``(C,)``. A convolution's ``bias``; for a BatchNorm in
    inference mode, :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`, the part that
    does not scale with the input: :math:`\beta - \mu \gamma / \sqrt{\sigma^2 + \epsilon}`
    (FullGrad's definition, from the paper's reference implementation). ``model`` is needed for NNX
    (the state is read through the model's graph); linen variables are read by path."""
    if model is None:
        from flaxcam.capture import LinenModel

        return LinenModel(None).effective_bias(variables, layer)  # type: ignore[arg-type]
    return as_model(model).effective_bias(variables, layer)


def input_and_layer_gradients(
    model: Any,
    variables: Any,
    images: Array,
    layers: tuple[str, ...],
    score_fn: ScoreFn,
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
) -> InputGradients:
    """The gradients of the target scores w.r.t. the input images and the outputs of ``layers``, from
    one forward and one backward pass (per target)."""
    model = as_model(model, apply_kwargs)
    layers = tuple(layers)
    scores_of = _scores_of(model, variables, layers, score_fn, output_fn)
    zeros = _zero_deltas(model, variables, images, layers)
    scores, vjp_fn, (logits, _, aux) = jax.vjp(scores_of, images, zeros, has_aux=True)
    input_gradients, layer_gradients = _per_target_vjp(vjp_fn, scores)
    return InputGradients(logits, scores, aux, input_gradients, tuple(layer_gradients))
