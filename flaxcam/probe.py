"""Activations and gradients at a named layer of any Flax linen model, with no edits to the model.

A *layer* is any submodule whose ``__call__`` returns an array; its name is the module path joined with
dots, e.g. ``"layer4"``, ``"layer3.1"`` or ``"layer3.1.conv2"`` for flaxcam's ResNets, ``"Conv_0"`` for an
auto-named submodule of a user's ``nn.compact`` module.

How it works: :func:`flax.linen.intercept_methods` wraps every submodule call during ``model.apply``.
At the target layer the interceptor records the output ``A`` and returns ``A + delta`` where ``delta`` is
a zero array that we differentiate with respect to. ``d score / d delta`` at ``delta = 0`` is exactly
``d score / d A``, and because parameters and inputs are closed over (never differentiated), JAX's
autodiff only transposes the operations *after* the layer: the backward pass costs the part of the
network between the layer and the output, nothing before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
OutputFn = Callable[[Any], Array]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One callable submodule of a model: dotted name, module class name and output shape."""

    name: str
    module_type: str
    shape: tuple[int, ...]

    @property
    def is_spatial(self) -> bool:
        """True for ``(batch, height, width, channels)`` outputs, the ones a CAM can be computed on, and
        ``(batch, depth, height, width, channels)`` outputs of 3-D networks."""
        return len(self.shape) in (4, 5)


class LayerError(ValueError):
    """A layer name that the model does not have, or a layer that cannot be used for the request."""


def layer_name(path: tuple[str, ...]) -> str:
    """The dotted name of a module path: ``("layer3", "1") -> "layer3.1"``."""
    return ".".join(path)


def _apply(model: nn.Module, variables: Mapping[str, Any], images: Array, apply_kwargs: tuple) -> Any:
    return model.apply(variables, images, **dict(apply_kwargs))


def list_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array | jax.ShapeDtypeStruct,
    apply_kwargs: tuple = (),
) -> list[LayerInfo]:
    """Every submodule called during ``model.apply``, in the order the calls *return*.

    ``variables`` may also be its :func:`shape_key`. Runs on shapes only (``jax.eval_shape``): no computation. Modules whose output is not a single array
    are listed with shape ``()``. A module called several times is listed once per call.
    """
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    return list(_list_layers_impl(model, shape_key(variables), spec, apply_kwargs))


def shape_key(variables: Mapping[str, Any] | _ShapeKey) -> _ShapeKey:
    """A hashable key for the structure and shapes of a variables tree (for caching traces); a key is
    returned as is. Reads each leaf's ``shape`` and ``dtype`` (canonicalized as JAX would, e.g. float64
    to float32 without x64), without building arrays: cheap enough to run on every ``explain`` call."""
    if isinstance(variables, _ShapeKey):
        return variables
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    return _ShapeKey(treedef, tuple((tuple(np.shape(leaf)), _canonical_dtype(leaf)) for leaf in leaves))


def _canonical_dtype(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:  # a Python scalar
        return jnp.result_type(leaf)
    return jax.dtypes.canonicalize_dtype(dtype)


class _ShapeKey:
    """Hash a variables tree by its structure, shapes and dtypes so that traces can be cached; ``tree``
    is the matching tree of ``jax.ShapeDtypeStruct`` (built on first use)."""

    def __init__(self, treedef: Any, shapes: tuple):
        self.treedef = treedef
        self.key = (treedef, shapes)
        self._shapes = shapes
        self._tree = None

    @property
    def tree(self) -> Any:
        if self._tree is None:
            self._tree = self.treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in self._shapes])
        return self._tree

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ShapeKey) and self.key == other.key


@functools.lru_cache(maxsize=64)
def _list_layers_impl(model, variables_key: _ShapeKey, spec, apply_kwargs) -> tuple[LayerInfo, ...]:
    records: list[LayerInfo] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path:
            shape = tuple(out.shape) if hasattr(out, "shape") else ()
            records.append(LayerInfo(layer_name(path), type(context.module).__name__, shape))
        return out

    def run(variables, images):
        with nn.intercept_methods(record):
            return _apply(model, variables, images, apply_kwargs)

    jax.eval_shape(run, variables_key.tree, spec)
    return tuple(records)


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
        )
    if len(matches) > 1:
        raise LayerError(f"layer {name!r} is called {len(matches)} times in one forward pass; pick a module called once")
    info = matches[0]
    if spatial_only and not info.is_spatial:
        raise LayerError(
            f"layer {name!r} outputs shape {info.shape}, not (batch, height, width, channels). Layers with "
            f"spatial outputs: {_format_names(layers, spatial_only=True)}"
        )
    return info


def forward_at_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
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
    paths = {tuple(layer.split(".")) if layer else (): i for i, layer in enumerate(layers)}
    head_path = tuple(record_inputs_of.split(".")) if record_inputs_of else None
    captured: dict[int, Array] = {}
    head_input: list[Array] = []

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if head_path is not None and path == head_path:
            head_input.append(args[0])
        out = next_fun(*args, **kwargs)
        index = paths.get(path)
        if index is not None:
            captured[index] = out
            if replacements is not None and replacements[index] is not None:
                out = replacements[index]
            if deltas is not None:
                out = out + deltas[index]
        return out

    with nn.intercept_methods(intercept):
        output = _apply(model, variables, images, apply_kwargs)
    missing = [layers[i] for i in range(len(layers)) if i not in captured]
    if missing:
        raise LayerError(f"layer(s) {missing} were not called during the forward pass")
    return output, tuple(captured[i] for i in range(len(layers))), head_input[0] if head_input else None


def forward_at_layer(
    model: nn.Module,
    variables: Mapping[str, Any],
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


def probe(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    layers: str | tuple[str, ...],
    score_fn: Callable[[Array], tuple[Array, Any]],
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
    with_gradients: bool = True,
) -> tuple[Array, Any, Any, Array, Any]:
    """Logits, activations at ``layers`` and d(target scores)/d(activations), for a batch, from one
    forward pass.

    ``score_fn(logits) -> (scores, aux)`` returns the ``(batch, T)`` target scores (T targets per image)
    and anything else to return (e.g. the chosen class indices). Images are independent (inference
    mode), so the gradient of ``scores[:, t].sum()`` holds every image's own gradient; the T targets are
    handled by ``vmap`` over T cotangents of one linearization.

    Returns ``(logits, activations, gradients, scores, aux)``: activations ``(B, h, w, C)`` and
    gradients ``(B, T, h, w, C)`` (``None`` when ``with_gradients`` is False) — or tuples of them, one
    per layer, when ``layers`` is a tuple.
    """
    single = isinstance(layers, str)
    names = (layers,) if single else tuple(layers)

    def unwrap(values):
        return values[0] if single and values is not None else values

    if not with_gradients:
        output, activations, _ = forward_at_layers(model, variables, images, names, None, apply_kwargs)
        logits = output_fn(output)
        scores, aux = score_fn(logits)
        return logits, unwrap(activations), None, scores, aux

    def scores_of(deltas):
        output, activations, _ = forward_at_layers(model, variables, images, names, deltas, apply_kwargs)
        logits = output_fn(output)
        scores, aux = score_fn(logits)
        return scores, (logits, activations, aux)

    shapes = jax.eval_shape(lambda: forward_at_layers(model, variables, images, names, None, apply_kwargs)[1])
    deltas = tuple(jnp.zeros(shape.shape, shape.dtype) for shape in shapes)
    scores, vjp_fn, (logits, activations, aux) = jax.vjp(scores_of, deltas, has_aux=True)
    num_targets = scores.shape[1]
    cotangents = jnp.broadcast_to(
        jnp.eye(num_targets, dtype=scores.dtype)[:, None, :], (num_targets, *scores.shape)
    )
    (gradients,) = jax.vmap(vjp_fn)(cotangents)  # per layer (T, B, h, w, C)
    gradients = tuple(jnp.moveaxis(g, 0, 1) for g in gradients)
    return logits, unwrap(activations), unwrap(gradients), scores, aux


# ---------------------------------------------------------------------------------------------------
# Higher-order and whole-model derivatives (ShapleyCAM, exact Grad-CAM++, FullGrad)
# ---------------------------------------------------------------------------------------------------


def _per_target_vjp(vjp_fn: Callable, scores: Array) -> Any:
    """Pull back the T one-hot cotangents of ``(B, T)`` scores; results get the target axis at 1."""
    num_targets = scores.shape[1]
    cotangents = jnp.broadcast_to(jnp.eye(num_targets, dtype=scores.dtype)[:, None, :], (num_targets, *scores.shape))
    pulled = jax.vmap(vjp_fn)(cotangents)
    return jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 0, 1), pulled)


def _scores_of_deltas(model, variables, images, names, score_fn, apply_kwargs, output_fn) -> Callable:
    def scores_of(deltas):
        output, activations, _ = forward_at_layers(model, variables, images, names, deltas, apply_kwargs)
        logits = output_fn(output)
        scores, aux = score_fn(logits)
        return scores, (logits, activations, aux)

    return scores_of


def probe_hessian(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    layers: tuple[str, ...],
    score_fn: Callable[[Array], tuple[Array, Any]],
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
) -> tuple[Array, tuple[Array, ...], tuple[Array, ...], tuple[Array, ...], Array, Any]:
    r"""Like :func:`probe`, plus the Hessian-vector product of each target score with the activations.

    For layer ``l`` with activations :math:`A` and target score :math:`s`:
    :math:`(H A)_i = \sum_j \frac{\partial^2 s}{\partial A_i \partial A_j} A_j` (the total second
    derivative: everything after the layer, other target layers included, depends on it). Computed
    forward-over-reverse, ``jax.jvp`` of the per-target gradient in the direction ``A``: one extra
    linearization per layer, no Hessian is materialized.

    Returns ``(logits, activations, gradients, hvps, scores, aux)``, the last three per-layer tuples of
    ``(B, h, w, C)`` / ``(B, T, h, w, C)`` arrays.
    """
    scores_of = _scores_of_deltas(model, variables, images, layers, score_fn, apply_kwargs, output_fn)
    shapes = jax.eval_shape(lambda: forward_at_layers(model, variables, images, layers, None, apply_kwargs)[1])
    zeros = tuple(jnp.zeros(shape.shape, shape.dtype) for shape in shapes)
    scores, (logits, activations, aux) = scores_of(zeros)

    def gradients_of(deltas):
        values, vjp_fn, _ = jax.vjp(scores_of, deltas, has_aux=True)
        return _per_target_vjp(vjp_fn, values)[0]  # per layer (B, T, h, w, C)

    gradients, hvps = [], []
    for index, layer_activations in enumerate(activations):
        direction = tuple(layer_activations if i == index else zeros[i] for i in range(len(layers)))
        layer_gradients, layer_hvps = jax.jvp(gradients_of, (zeros,), (direction,))
        gradients.append(layer_gradients[index])
        hvps.append(layer_hvps[index])
    return logits, activations, tuple(gradients), tuple(hvps), scores, aux


def derivative_diagonals(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    layers: tuple[str, ...],
    score_fn: Callable[[Array], tuple[Array, Any]],
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
    chunk_size: int = 32,
) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    r"""The diagonals of the second and third derivatives of each target score w.r.t. each layer's
    activations: :math:`\partial^2 s / \partial A_i^2` and :math:`\partial^3 s / \partial A_i^3` for
    every element ``i`` of ``A`` ``(h, w, C)``.

    Exact, by third-order forward mode: for each element ``i``, the three nested ``jax.jvp`` of
    :math:`t \mapsto s(A + t e_i)` at ``t = 0`` give both derivatives in one pass. There is no cheaper
    exact way to get a Hessian's diagonal for a general network, so the cost is **one pass per
    element of the layer**, ``n = h·w·C`` passes (e.g. 25 088 at a ResNet's ``layer4`` for a 224×224
    input), each a third-order jvp of the network after the layer (up to 8 streams of its forward
    computation, fewer where XLA merges the identical ones). Images are independent, so direction ``e_i`` is applied to every image at once and
    every target score comes out of the same pass: the count is per batch, not per image or target.
    The passes run on device, ``chunk_size`` directions at a time (vmapped, in a ``lax.map``), so
    memory is bounded by ``chunk_size × batch`` tangent copies of the activations after the layer.

    Returns ``(second, third)``: per-layer tuples of ``(B, T, h, w, C)`` arrays.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _, activations, _ = forward_at_layers(model, variables, images, layers, None, apply_kwargs)
    seconds, thirds = [], []
    for index in range(len(layers)):
        # the layer's output is computed once, above; each pass evaluates the network after it
        replacements = tuple(a if i == index else None for i, a in enumerate(activations))

        def scores_at(delta: Array, index: int = index, replacements: tuple = replacements) -> Array:
            deltas = tuple(delta if i == index else jnp.zeros_like(a) for i, a in enumerate(activations))
            output, _, _ = forward_at_layers(model, variables, images, layers, deltas, apply_kwargs, replacements=replacements)
            return score_fn(output_fn(output))[0]  # (B, T)

        second, third = _diagonals_of(scores_at, activations[index], chunk_size)
        seconds.append(second)
        thirds.append(third)
    return tuple(seconds), tuple(thirds)


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

    chunks = -(-size // chunk_size)
    elements = jnp.minimum(jnp.arange(chunks * chunk_size), size - 1).reshape(chunks, chunk_size)
    second, third = jax.lax.map(jax.vmap(second_and_third), elements)  # (chunks, chunk, B, T)

    def arrange(values: Array) -> Array:
        values = values.reshape(chunks * chunk_size, batch, -1)[:size]  # (n, B, T)
        return jnp.moveaxis(values, 0, -1).reshape(batch, values.shape[-1], *element_shape)

    return arrange(second), arrange(third)


@dataclasses.dataclass(frozen=True)
class BiasLayer:
    """A convolution or BatchNorm with a bias (what FullGrad reads): dotted name, kind
    (``"Conv"`` or ``"BatchNorm"``) and, for BatchNorm, its epsilon."""

    name: str
    kind: str
    epsilon: float = 0.0


def bias_layers(
    model: nn.Module, variables: Mapping[str, Any], images: Array | jax.ShapeDtypeStruct, apply_kwargs: tuple = ()
) -> tuple[BiasLayer, ...]:
    """Every ``nn.Conv`` and ``nn.BatchNorm`` with a bias and a ``(B, h, w, C)`` output, in call order —
    pytorch-grad-cam's FullGrad takes every ``Conv2d`` / ``BatchNorm2d`` whose bias is not None.
    Shapes only (``jax.eval_shape``; ``variables`` may be its :func:`shape_key`); a module called more
    than once is an error (its gradient would mix the calls)."""
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    return _bias_layers_impl(model, shape_key(variables), spec, apply_kwargs)


@functools.lru_cache(maxsize=64)
def _bias_layers_impl(model, variables_key: _ShapeKey, spec, apply_kwargs) -> tuple[BiasLayer, ...]:
    found: list[BiasLayer] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and getattr(out, "ndim", 0) == 4 and module.path:
            name = layer_name(tuple(module.path))
            if isinstance(module, nn.Conv) and module.use_bias:
                found.append(BiasLayer(name, "Conv"))
            elif isinstance(module, nn.BatchNorm) and module.use_bias:
                found.append(BiasLayer(name, "BatchNorm", float(module.epsilon)))
        return out

    def run(variables, images):
        with nn.intercept_methods(record):
            return _apply(model, variables, images, apply_kwargs)

    jax.eval_shape(run, variables_key.tree, spec)
    names = [layer.name for layer in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LayerError(f"FullGrad needs each biased layer called once per forward pass; called several times: {repeated}")
    return tuple(found)


def _subtree(variables: Mapping[str, Any], collection: str, name: str) -> Mapping[str, Any]:
    node: Any = variables[collection]
    for part in name.split("."):
        node = node[part]
    return node


def effective_bias(variables: Mapping[str, Any], layer: BiasLayer) -> Array:
    r"""The bias a layer adds to its output ``(C,)``. A convolution's ``bias``; for a BatchNorm in
    inference mode, :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`, the part that
    does not scale with the input: :math:`\beta - \mu \gamma / \sqrt{\sigma^2 + \epsilon}`
    (FullGrad's definition, from the paper's reference implementation)."""
    params = _subtree(variables, "params", layer.name)
    if layer.kind == "Conv":
        return params["bias"]
    stats = _subtree(variables, "batch_stats", layer.name)
    scale = params.get("scale", jnp.ones_like(stats["mean"]))
    return params["bias"] - stats["mean"] * scale / jnp.sqrt(stats["var"] + layer.epsilon)


def input_and_layer_gradients(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    layers: tuple[str, ...],
    score_fn: Callable[[Array], tuple[Array, Any]],
    *,
    apply_kwargs: tuple = (),
    output_fn: OutputFn = default_output_fn,
) -> tuple[Array, Array, Any, Array, tuple[Array, ...]]:
    """The gradients of the target scores w.r.t. the input images and the outputs of ``layers``, from
    one forward and one backward pass (per target).

    Returns ``(logits, scores, aux, input_gradients (B, T, H, W, C), layer_gradients)``, the last a
    per-layer tuple of ``(B, T, h, w, C)``.
    """
    shapes = jax.eval_shape(lambda: forward_at_layers(model, variables, images, layers, None, apply_kwargs)[1])
    zeros = tuple(jnp.zeros(shape.shape, shape.dtype) for shape in shapes)

    def scores_of(inputs, deltas):
        output, _, _ = forward_at_layers(model, variables, inputs, layers, deltas, apply_kwargs)
        logits = output_fn(output)
        scores, aux = score_fn(logits)
        return scores, (logits, aux)

    scores, vjp_fn, (logits, aux) = jax.vjp(scores_of, images, zeros, has_aux=True)
    input_gradients, layer_gradients = _per_target_vjp(vjp_fn, scores)
    return logits, scores, aux, input_gradients, tuple(layer_gradients)
