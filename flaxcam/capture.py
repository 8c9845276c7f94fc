"""Run any Flax model — linen or NNX — with taps at named layers, without editing the model.

A *tap* at a layer records the layer's output ``A`` and returns ``A + delta`` (or a replacement plus
``delta``) to the rest of the network; ``d score / d delta`` at ``delta = 0`` is ``d score / d A``.
Parameters and inputs are closed over, so autodiff only transposes what runs *after* the layer.

* **linen** (:class:`LinenModel`): :func:`flax.linen.intercept_methods` wraps every submodule call
  during ``model.apply(variables, images)``; a layer is named by its module path joined with dots
  (``"layer4"``, ``"layer3.1.conv2"``, ``"Conv_0"``).
* **NNX** (:class:`NNXModel`): the step receives the model's state (``nnx.state(model)``); inside the
  trace ``nnx.merge(graphdef, state)`` builds a *private copy* of the module, the tapped submodules of
  the copy are replaced by a small wrapper that calls the original and applies the tap, and the copy is
  called. The user's module is never touched. A layer is named by its attribute path
  (``"layer4"``, ``"blocks.3.conv"``, ``"layers.0"``).

Both expose the same small interface (:class:`ModelAdapter`), used by :mod:`flaxcam.probe` and the step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Path = tuple[str | int, ...]


#: Class names of the modules whose output is a transformer block's attention probabilities
#: ``(B, heads, queries, keys)`` (the softmax over the keys), read by the attention methods (LeGrad).
ATTENTION_TYPES = ("AttentionProbabilities",)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One callable submodule of a model: dotted name, module class name and output shape."""

    name: str
    module_type: str
    shape: tuple[int, ...]

    @property
    def is_spatial(self) -> bool:
        """True for ``(batch, height, width, channels)`` outputs, the ones a CAM can be computed on, and
        ``(batch, depth, height, width, channels)`` outputs of 3-D networks (attention probabilities
        ``(batch, heads, queries, keys)`` are not)."""
        return len(self.shape) in (4, 5) and not self.is_attention

    @property
    def is_attention(self) -> bool:
        """True for attention probabilities ``(batch, heads, queries, keys)`` (:data:`ATTENTION_TYPES`)."""
        return self.module_type in ATTENTION_TYPES and len(self.shape) == 4


@dataclasses.dataclass(frozen=True)
class BiasLayer:
    """A convolution or BatchNorm with a bias (what FullGrad reads): dotted name, kind
    (``"Conv"`` or ``"BatchNorm"``) and, for BatchNorm, its epsilon."""

    name: str
    kind: str
    epsilon: float = 0.0


class LayerError(ValueError):
    """A layer name that the model does not have, or a layer that cannot be used for the request."""


class ModelAdapter(Protocol):
    """What the probe needs of a model: run it with taps, list its layers, read biases and heads."""

    def forward(
        self,
        variables: Any,
        images: Array,
        layers: tuple[str, ...],
        deltas: tuple[Array, ...] | None = None,
        record_inputs_of: str | None = None,
        replacements: tuple[Array | None, ...] | None = None,
    ) -> tuple[Any, tuple[Array, ...], Array | None]: ...

    def list_layers(self, variables_key: Any, spec: jax.ShapeDtypeStruct) -> tuple[LayerInfo, ...]: ...

    def bias_layers(self, variables_key: Any, spec: jax.ShapeDtypeStruct) -> tuple[BiasLayer, ...]: ...

    def effective_bias(self, variables: Any, layer: BiasLayer) -> Array: ...

    def head_kernel(self, variables: Any, head: str) -> Array: ...

    def call_method(self, variables: Any, name: str, *args: Any) -> Any: ...


def layer_name(path: Path) -> str:
    """The dotted name of a module path: ``("layer3", "1") -> "layer3.1"``, ``("blocks", 3) -> "blocks.3"``."""
    return ".".join(str(part) for part in path)


def _bias_of_batchnorm(scale: Array | None, bias: Array, mean: Array, var: Array, epsilon: float) -> Array:
    r""":math:`\beta - \mu \gamma / \sqrt{\sigma^2 + \epsilon}`: the part of an inference-mode BatchNorm's
    output that does not scale with its input (FullGrad's definition)."""
    scale = jnp.ones_like(mean) if scale is None else scale
    return bias - mean * scale / jnp.sqrt(var + epsilon)


def _check_called(layers: tuple[str, ...], captured: Mapping[int, Array]) -> None:
    missing = [layers[i] for i in range(len(layers)) if i not in captured]
    if missing:
        raise LayerError(f"layer(s) {missing} were not called during the forward pass")


def _repeated_bias_layers(found: list[BiasLayer]) -> None:
    names = [layer.name for layer in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LayerError(
            f"FullGrad needs each biased layer called once per forward pass; called several times: {repeated}"
        )


# ---------------------------------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A linen module and the keyword arguments of its ``apply`` (sorted pairs, hashable)."""

    module: nn.Module
    apply_kwargs: tuple = ()

    def apply(self, variables: Any, images: Array) -> Any:
        return self.module.apply(variables, images, **dict(self.apply_kwargs))

    def forward(self, variables, images, layers, deltas=None, record_inputs_of=None, replacements=None):
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
            if index is None:
                return out
            captured[index] = out
            return _tapped(out, index, deltas, replacements)

        with nn.intercept_methods(intercept):
            output = self.apply(variables, images)
        _check_called(layers, captured)
        return output, tuple(captured[i] for i in range(len(layers))), head_input[0] if head_input else None

    def list_layers(self, variables_key, spec):
        return _linen_layers(self, variables_key, spec)

    def bias_layers(self, variables_key, spec):
        return _linen_bias_layers(self, variables_key, spec)

    def effective_bias(self, variables, layer):
        params = _subtree(variables, "params", layer.name)
        if layer.kind == "Conv":
            return params["bias"]
        stats = _subtree(variables, "batch_stats", layer.name)
        return _bias_of_batchnorm(params.get("scale"), params["bias"], stats["mean"], stats["var"], layer.epsilon)

    def head_kernel(self, variables, head):
        return _subtree(variables, "params", head)["kernel"]

    def call_method(self, variables, name, *args):
        """``module.name(*args)`` with these variables (e.g. ``project_tokens``)."""
        if not callable(getattr(self.module, name, None)):
            raise LayerError(f"{type(self.module).__name__} has no method {name!r}")
        return self.module.apply(variables, *args, method=name)

    def example_variables(self, spec: jax.ShapeDtypeStruct) -> Any:
        """Concrete random variables for a one-off numerical check of the architecture."""
        with jax.ensure_compile_time_eval():
            return self.module.init(jax.random.key(0), jnp.zeros(spec.shape, spec.dtype), **dict(self.apply_kwargs))


def _tapped(out: Array, index: int, deltas, replacements) -> Array:
    """What the network continues with after a tapped layer: its output, or ``replacements[index]`` (an
    array, or a function of the output such as ``jax.lax.stop_gradient``), plus ``deltas[index]``
    (either None: unchanged)."""
    replacement = None if replacements is None else replacements[index]
    if callable(replacement):
        out = replacement(out)
    elif replacement is not None:
        out = replacement
    if deltas is not None and deltas[index] is not None:
        out = out + deltas[index]
    return out


def _subtree(variables: Mapping[str, Any], collection: str, name: str) -> Mapping[str, Any]:
    node: Any = variables[collection]
    for part in (name or "").split("."):
        node = node[part]
    return node


@functools.lru_cache(maxsize=64)
def _linen_layers(model: LinenModel, variables_key, spec) -> tuple[LayerInfo, ...]:
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
            return model.apply(variables, images)

    jax.eval_shape(run, variables_key.tree, spec)
    return tuple(records)


@functools.lru_cache(maxsize=64)
def _linen_bias_layers(model: LinenModel, variables_key, spec) -> tuple[BiasLayer, ...]:
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
            return model.apply(variables, images)

    jax.eval_shape(run, variables_key.tree, spec)
    _repeated_bias_layers(found)
    return tuple(found)


# ---------------------------------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------------------------------


class _Tap(nnx.Module):
    """Stands in for submodule ``inner`` on a private copy of an NNX model: calls it, then ``hook``."""

    def __init__(self, inner: nnx.Module, name: str, hook: Callable):
        self.inner = inner
        self.tap_name = name
        self.tap_hook = hook

    def __call__(self, *args, **kwargs):
        return self.tap_hook(self.tap_name, self.inner, args, kwargs)

    def __getattr__(self, name: str) -> Any:  # other methods and attributes of the wrapped module
        return getattr(self.inner, name)


def _child(node: Any, part: str | int) -> Any:
    return node[part] if isinstance(part, int) else getattr(node, part)


def _set_child(node: Any, part: str | int, value: Any) -> None:
    if isinstance(part, int):
        node[part] = value
    else:
        setattr(node, part, value)


def _callable_submodules(model: nnx.Module) -> dict[str, Path]:
    """Every callable submodule of ``model`` (not containers such as ``nnx.List``), by dotted name."""
    return {
        layer_name(cast(Path, path)): cast(Path, tuple(path))
        for path, node in nnx.iter_graph(model)
        if path and isinstance(node, nnx.Module) and callable(node)
    }


def training_mode_modules(model: nnx.Module) -> list[str]:
    """Submodules in training mode: a BatchNorm that updates its statistics (``use_running_average``
    False) or a Dropout that drops (``deterministic`` False and a positive rate)."""
    found = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        if getattr(node, "use_running_average", True) is False or (
            getattr(node, "deterministic", True) is False and getattr(node, "rate", 0) > 0
        ):
            found.append(f"{layer_name(cast(Path, path)) or '<model>'} ({type(node).__name__})")
    return found


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """An NNX model as a graph definition (static, hashable); its state is the step's ``variables``.
    ``call_kwargs``: sorted keyword arguments of the model's ``__call__``.

    The hash is computed once: hashing a graph definition walks all of it (about 2 ms on
    EfficientNet-Lite0), and every cache lookup of a plan or a compiled step hashes the adapter."""

    graphdef: Any
    call_kwargs: tuple = ()
    #: the state's tree definition, when known (:func:`flaxcam.plan.split_nnx`): the step then also takes
    #: the state's leaves as a plain list (``explain`` passes them so: a list flattens in C++, an
    #: ``nnx.State`` of variables in Python, 0.2 ms per flatten on EfficientNet-Lite0 in
    #: ``python -m benchmarks.probes.nnx_overhead``). Left out of equality: it follows from the graph
    #: definition.
    state_treedef: Any = dataclasses.field(default=None, compare=False)

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.graphdef, self.call_kwargs))
            object.__setattr__(self, "_hash", cached)
        return cached

    def _merged(self, state: Any) -> nnx.Module:
        if isinstance(state, list) and self.state_treedef is not None:
            state = jax.tree_util.tree_unflatten(self.state_treedef, state)
        return nnx.merge(self.graphdef, state, copy=True)  # fresh Variables at the current trace level

    def apply(self, variables: Any, images: Array) -> Any:
        return self._merged(variables)(images, **dict(self.call_kwargs))

    def _run_tapped(self, state: Any, images: Array, taps: Mapping[str, Callable]) -> Any:
        """Call a private copy of the model with ``taps[name](inner, args, kwargs)`` standing in for
        each named submodule's call."""
        copy = self._merged(state)
        submodules = _callable_submodules(copy)
        for name in taps:
            if name not in submodules:
                raise LayerError(f"unknown layer {name!r}; layers of this NNX model: {sorted(submodules)}")
        # replace deepest first so that a tapped module inside a tapped module is wrapped on its parent
        for name in sorted(taps, key=lambda n: -len(submodules[n])):
            path = submodules[name]
            parent = copy
            for part in path[:-1]:
                parent = _child(parent, part)
            inner = _child(parent, path[-1])
            _set_child(
                parent, path[-1], _Tap(inner, name, lambda n, module, args, kwargs: taps[n](module, args, kwargs))
            )
        return copy(images, **dict(self.call_kwargs))

    def forward(self, variables, images, layers, deltas=None, record_inputs_of=None, replacements=None):
        captured: dict[int, Array] = {}
        head_input: list[Array] = []
        taps: dict[str, Callable] = {}
        for index, layer in enumerate(layers):

            def tap(module, args, kwargs, index=index):
                out = module(*args, **kwargs)
                captured[index] = out
                return _tapped(out, index, deltas, replacements)

            taps[layer] = tap
        if record_inputs_of:
            inner_tap = taps.get(record_inputs_of)

            def record(module, args, kwargs):
                head_input.append(args[0])
                return inner_tap(module, args, kwargs) if inner_tap else module(*args, **kwargs)

            taps[record_inputs_of] = record
        output = self._run_tapped(variables, images, taps)
        _check_called(layers, captured)
        return output, tuple(captured[i] for i in range(len(layers))), head_input[0] if head_input else None

    def list_layers(self, variables_key, spec):
        return _nnx_layers(self, variables_key, spec)

    def bias_layers(self, variables_key, spec):
        return _nnx_bias_layers(self, variables_key, spec)

    def _module_at(self, variables: Any, name: str) -> nnx.Module:
        node = self._merged(variables)
        for part in _callable_submodules(node)[name]:
            node = _child(node, part)
        return node

    def effective_bias(self, variables, layer):
        module = self._module_at(variables, layer.name)
        if layer.kind == "Conv":
            return module.bias[...]
        scale = None if module.scale is None else module.scale[...]
        return _bias_of_batchnorm(scale, module.bias[...], module.mean[...], module.var[...], layer.epsilon)

    def head_kernel(self, variables, head):
        module = self._module_at(variables, head)
        kernel = getattr(module, "kernel", None)
        if kernel is None:
            raise KeyError(head)
        return kernel[...]

    def call_method(self, variables, name, *args):
        """``model.name(*args)`` on a private copy of the model with this state."""
        model = self._merged(variables)
        if not callable(getattr(model, name, None)):
            raise LayerError(f"{type(model).__name__} has no method {name!r}")
        return getattr(model, name)(*args)


def _record_all(model: NNXModel, variables_key, spec, on_call: Callable[[str, nnx.Module, Any], None]) -> None:
    def run(state, images):
        names = _callable_submodules(model._merged(state))

        def tap(name):
            def call(module, args, kwargs):
                out = module(*args, **kwargs)
                on_call(name, module, out)
                return out

            return call

        return model._run_tapped(state, images, {name: tap(name) for name in names})

    jax.eval_shape(run, variables_key.tree, spec)


@functools.lru_cache(maxsize=64)
def _nnx_layers(model: NNXModel, variables_key, spec) -> tuple[LayerInfo, ...]:
    records: list[LayerInfo] = []

    def on_call(name, module, out):
        shape = tuple(out.shape) if hasattr(out, "shape") else ()
        records.append(LayerInfo(name, type(module).__name__, shape))

    _record_all(model, variables_key, spec, on_call)
    return tuple(records)


@functools.lru_cache(maxsize=64)
def _nnx_bias_layers(model: NNXModel, variables_key, spec) -> tuple[BiasLayer, ...]:
    found: list[BiasLayer] = []

    def on_call(name, module, out):
        if getattr(out, "ndim", 0) != 4 or getattr(module, "bias", None) is None:
            return
        if isinstance(module, nnx.Conv):
            found.append(BiasLayer(name, "Conv"))
        elif isinstance(module, nnx.BatchNorm):
            found.append(BiasLayer(name, "BatchNorm", float(module.epsilon)))

    _record_all(model, variables_key, spec, on_call)
    _repeated_bias_layers(found)
    return tuple(found)


# ---------------------------------------------------------------------------------------------------
# which adapter
# ---------------------------------------------------------------------------------------------------


def is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


def as_model(model: Any, apply_kwargs: tuple = ()) -> Any:
    """The adapter for ``model``: a linen module, an NNX module (its graph definition is kept; the
    state travels as the step's variables) or an adapter (returned as is)."""
    if isinstance(model, (LinenModel, NNXModel)) or getattr(model, "is_model_adapter", False):
        return model
    if hasattr(model, "as_adapter"):  # e.g. flaxcam.methods.guided.GuidedModel
        return model.as_adapter(apply_kwargs)
    if isinstance(model, nnx.Module):
        return NNXModel(nnx.graphdef(model), apply_kwargs)
    if isinstance(model, nn.Module):
        return LinenModel(model, apply_kwargs)
    raise TypeError(f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}")


def shape_key(variables: Any) -> _ShapeKey:
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
    if jnp.issubdtype(dtype, jax.dtypes.extended):  # PRNG keys (an NNX model's RngState)
        return dtype
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
