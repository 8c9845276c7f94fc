"""Host planning, once: ``explainer(model, method=..., layer=...)`` → a pure step.

:func:`explainer` checks the request (method, options, targets kind) and returns an
:class:`Explainer`. Calling it, ``fn(variables, images, targets=None, key=None, image_ids=None)``,
plans once per input shape — layer resolution, CAM's head detection, FullGrad's biased layers, all on
shapes (cached) — and runs :func:`flaxcam.step.explain_step`, a pure JAX function: ``fn`` works under
``jax.jit``, ``jax.vmap`` (over images, or over ``variables`` for weight ensembles), ``lax.scan`` /
``lax.map`` and ``shard_map``, and follows the shardings of its inputs. :func:`flaxcam.explain` is the
convenience wrapper around the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxcam.capture import LayerError, LayerInfo, NNXModel, as_model, is_nnx, training_mode_modules
from flaxcam.errors import check_layer_outputs
from flaxcam.methods import Method, get_method
from flaxcam.probe import (
    OutputFn,
    default_output_fn,
    forward_at_layer,
    resolve_attention_blocks,
    resolve_layer,
    shape_key,
)
from flaxcam.step import Explanation, StepConfig, explain_step
from flaxcam.targets import CLASS_SCORES, Binary, Embedding, Segmentation, TargetSpec, resolve_targets
from flaxcam.volumes import check_volumetric

Array = jax.Array

#: Result of the one-off CAM head check, keyed by model, layer, head, input shape and the *structure*
#: of the variables (not their identity): whether a head reads the pooled layer output is a property of
#: the architecture, so new weights or a rebuilt variables dict of the same model reuse the result.
_HEAD_FEATURES: dict[tuple, str | None] = {}

#: Layer types CAM's head may be (linen / NNX names).
HEAD_TYPES = ("Dense", "Linear")


def check_method_options(method: Method, options: Mapping[str, Any] | None) -> tuple:
    """The options as sorted, hashable ``(name, value)`` pairs; a ValueError names the valid ones."""
    options = dict(options or {})
    valid = method.options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{name}={default!r}" for name, default in valid.items()) or "none"
        raise ValueError(f"method {method.name!r} has no option(s) {unknown}; its options (defaults): {listed}")
    for name, value in options.items():
        if isinstance(valid[name], int):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"option {name}={value!r} of method {method.name!r} must be a positive integer")
            options[name] = int(value)
        elif isinstance(valid[name], float):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= float(value) < float("inf"):
                raise ValueError(f"option {name}={value!r} of method {method.name!r} must be a non-negative number")
            options[name] = float(value)
    return tuple(sorted(options.items()))


def check_nnx_eval_mode(model: Any) -> None:
    """An NNX model in training mode (BatchNorm updating its statistics, active Dropout) would explain
    a different function per call and mutate state: refuse it with the modules to switch."""
    if is_nnx(model):
        training = training_mode_modules(model)
        if training:
            raise ValueError(
                f"the NNX model is in training mode ({', '.join(training[:5])}); call model.eval() "
                "(or nnx.view / set_attributes(deterministic=True, use_running_average=True)) before explaining"
            )


@dataclasses.dataclass(frozen=True)
class _NNXSplit:
    """What :func:`split_nnx` keeps of an NNX model's last split: the adapter, the model's own pytree
    structure then (``jax.tree.flatten(model)``: node types, attribute names, static values, variable
    types and metadata) and the model's variables in the order of the state's leaves (empty when the
    model's leaves and the state's do not match one to one)."""

    adapter: NNXModel
    treedef: Any
    variables: tuple[nnx.Variable, ...]


_NNX_SPLITS: weakref.WeakKeyDictionary[nnx.Module, _NNXSplit] = weakref.WeakKeyDictionary()


def _distinct(leaves: list) -> bool:
    return len({id(leaf) for leaf in leaves}) == len(leaves)


def _matches(split: _NNXSplit, leaves: list, treedef: Any) -> bool:
    return bool(split.variables) and split.treedef == treedef and _distinct(leaves)


def split_nnx(
    model: nnx.Module, call_kwargs: tuple = (), deferred: bool = False
) -> tuple[NNXModel, Any, Callable[[], bool] | None]:
    """The adapter and the current state of an NNX model — the state as the plain list of its leaves
    when the adapter knows the state's tree definition (``NNXModel.state_treedef``) — and, with
    ``deferred``, a check still to make (else ``None``).

    ``nnx.split`` walks the module graph in Python (5 ms for EfficientNet-Lite0 against a 12 ms batch-1
    Grad-CAM; ``python -m benchmarks.probes.nnx_overhead``), so the last split of each model is kept (weakly) and reused while the model's pytree
    structure is unchanged: ``jax.tree.flatten(model)`` (0.7 ms) gives the model's arrays and a tree
    definition that compares node types, attribute names, static attributes (eval / training mode among
    them) and variable metadata. With an equal definition and no array in two places (a shared variable
    or submodule would be one node in the graph but two in the tree), the arrays in tree order are the
    state's leaves in order (checked at the split). Anything else — a replaced submodule of another
    structure, ``model.train()``, changed metadata — splits again, and a new graph definition gets the
    eval-mode check. A model whose tree and state do not match one to one is split on every call.

    ``deferred`` (``explain``'s fast path): the state is read from the variables of the last split
    (0.02 ms) and the returned check — the flatten above, and the arrays read being the model's arrays
    now — runs after the computation is dispatched, overlapping it; when it fails the caller marks
    the split stale (:func:`invalidate_nnx_split`) and explains again."""
    cached = _NNX_SPLITS.get(model)
    if deferred and cached is not None and cached.variables and cached.adapter.call_kwargs == call_kwargs:
        split = cached
        used = [variable.get_raw_value() for variable in split.variables]

        def still_current() -> bool:
            leaves, treedef = jax.tree_util.tree_flatten(model)
            return (
                _matches(split, leaves, treedef)
                and len(leaves) == len(used)
                and all(a is b for a, b in zip(leaves, used))
            )

        return split.adapter, used, still_current
    leaves, treedef = jax.tree_util.tree_flatten(model)
    if cached is not None and cached.adapter.call_kwargs == call_kwargs and _matches(cached, leaves, treedef):
        return cached.adapter, leaves, None
    graphdef, state = nnx.split(model)
    state_leaves, state_treedef = jax.tree_util.tree_flatten(state)
    one_to_one = (
        len(state_leaves) == len(leaves) and all(a is b for a, b in zip(state_leaves, leaves)) and _distinct(leaves)
    )
    adapter = NNXModel(graphdef, call_kwargs, state_treedef if one_to_one else None)
    if cached is not None and cached.adapter == adapter:
        adapter = cached.adapter  # keeps its computed hash
    else:
        check_nnx_eval_mode(model)
    variables = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    _NNX_SPLITS[model] = _NNXSplit(adapter, treedef, tuple(variables) if one_to_one else ())
    return adapter, leaves if one_to_one else state, None


def invalidate_nnx_split(model: nnx.Module) -> None:
    """Mark the kept split of ``model`` stale (:func:`split_nnx`): its next call splits again (and
    checks eval mode again only if the graph definition changed)."""
    cached = _NNX_SPLITS.get(model)
    if cached is not None:
        _NNX_SPLITS[model] = dataclasses.replace(cached, variables=())


@dataclasses.dataclass(frozen=True)
class Explainer:
    """The planned request; ``fn(variables, images, targets=None, key=None, image_ids=None)`` runs it.

    ``variables``: a linen model's variables, or an NNX model's state (``nnx.state(model)``, any
    ``nnx.State`` of the same graph, e.g. one of a stack of ensemble states under ``vmap``).
    ``targets``: per-call target data of the kind given to :func:`explainer` — ``(B,)`` / ``(B, T)``
    class indices for ``targets="classes"``, a :class:`~flaxcam.targets.Binary` / ``Segmentation`` /
    ``Embedding`` with array fields for those kinds; ``None`` otherwise. ``key``: one PRNG key, or
    ``(B,)`` keys (one per image) for the stochastic methods. ``image_ids``: ``(B,)`` ints identifying
    the images (e.g. their index in a data set) — image ``b``'s noise is keyed by ``image_ids[b]``
    (default: its position in the batch).
    """

    model: Any  # capture adapter
    method: Method
    layer: str | tuple[str | None, ...] | None
    top_k: int | None
    score: str
    head: str | None
    output_fn: OutputFn
    reshape: Callable[[Array], Array] | None
    method_options: tuple
    eigen_smooth: bool
    chunk_size: int
    aug_smooth: bool
    targets_kind: Any = dataclasses.field(
        default=None, compare=False, hash=False
    )  # None, 'classes', a target or a callable
    example_variables: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __call__(
        self,
        variables: Any,
        images: Array,
        targets: Any = None,
        key: Array | None = None,
        image_ids: Array | None = None,
    ) -> Explanation:
        config, target_data = self.configure(variables, images, targets)
        return explain_step(config, variables, images, target_data, _as_key(self.method, key), image_ids)

    def configure(self, variables: Any, images: Any, targets: Any = None) -> tuple[StepConfig, dict | None]:
        """The static step configuration and the target data for a batch (host work, cached on shapes)."""
        planned = self.plan(variables, images)
        target_spec, target_data = self._targets(targets, images.shape[0], planned.output_shape)
        return self.step_config(planned, target_spec), target_data

    def plan(self, variables: Any, images: Any) -> _Planned:
        """Layers, CAM head, FullGrad layers and output shape for these input and variables shapes."""
        spec = jax.ShapeDtypeStruct(tuple(images.shape), images.dtype)
        return _plan(self, shape_key(variables), spec, _concrete(variables))

    def step_config(self, planned: _Planned, target_spec: TargetSpec) -> StepConfig:
        if self.method.score_transform is not None and (
            target_spec.kind not in ("argmax", "classes", "top_k") or target_spec.score != "logit"
        ):
            raise ValueError(f"{self.method.name} needs class targets scored by their logit (score='logit')")
        if self.method.attention_layers and target_spec.kind not in ("argmax", "classes", "top_k"):
            raise ValueError(
                f"{self.method.name} explains class targets (top class, top_k= or class indices): it scores each "
                f"block's tokens with the model's classifier; got a {target_spec.kind!r} target"
            )
        return StepConfig(
            self.model,
            self.method,
            planned.layers,
            planned.head,
            planned.head_features,
            target_spec,
            self.output_fn,
            self.eigen_smooth,
            self.chunk_size,
            self.aug_smooth,
            planned.reshape or self.reshape,
            self.method_options,
            planned.biased,
            planned.attention,
        )

    def _targets(self, targets: Any, batch: int, output_shape: tuple[int, ...]) -> tuple[TargetSpec, dict | None]:
        kind = self.targets_kind
        if kind is None or self.top_k is not None or (callable(kind) and not isinstance(kind, type)):
            if targets is not None:
                raise ValueError(
                    "this explainer chooses its targets itself; create it with targets='classes' to pass classes per call"
                )
            chosen = None if kind is None else kind
            return resolve_targets(chosen, self.top_k, batch, output_shape, self.score)
        if kind == "classes":
            if targets is None:
                raise ValueError(
                    "this explainer was created with targets='classes': pass targets= (B,) or (B, T) class indices"
                )
            return resolve_targets(targets, None, batch, output_shape, self.score)
        return resolve_targets(kind if targets is None else targets, None, batch, output_shape, self.score)


def _as_key(method: Method, key: Array | None) -> Array | None:
    if "key" not in method.inputs:
        return None
    key = jax.random.key(0) if key is None else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 key(s) (jax.random.PRNGKey)
        key = jax.random.wrap_key_data(key)
    return key


def _concrete(variables: Any) -> Any:
    """The variables when they hold concrete values (for the numerical head check), else None."""
    leaves = jax.tree_util.tree_leaves(variables)
    return None if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves) else variables


@dataclasses.dataclass(frozen=True)
class _Planned:
    layers: tuple[str, ...]
    head: str | None
    head_features: str
    biased: tuple
    output_shape: tuple[int, ...]
    attention: tuple[str, ...] = ()  # attention methods: the attention layer of each block
    reshape: Callable[[Array], Array] | None = None  # attention methods: tokens -> patch grid


_PLANS: dict[tuple, _Planned] = {}


def _plan(explainer: Explainer, variables_key: Any, spec: jax.ShapeDtypeStruct, variables: Any) -> _Planned:
    """Layer resolution, CAM's head, FullGrad's layers and the output shape, once per explainer and
    input / variables shapes."""
    cache_key = (explainer, variables_key, spec)
    if cache_key in _PLANS:
        return _PLANS[cache_key]
    model, method = explainer.model, explainer.method
    layers = list(model.list_layers(variables_key, spec))
    requested = (
        [explainer.layer] if explainer.layer is None or isinstance(explainer.layer, str) else list(explainer.layer)
    )
    if method.bias_layers:
        requested = []
    if method.attention_layers:
        return _plan_attention(explainer, layers, requested, variables_key, spec, cache_key)
    layer_infos = [resolve_layer(layers, name, spatial_only=explainer.reshape is None) for name in requested]
    check_layer_outputs(layer_infos, spec.shape)
    if explainer.reshape is None:  # reshape= turns token layers into 2-D grids (checked below)
        check_volumetric(
            method, layer_infos, spec, aug_smooth=explainer.aug_smooth, eigen_smooth=explainer.eigen_smooth
        )
    if explainer.reshape is not None:
        for info in layer_infos:
            grid = jax.eval_shape(explainer.reshape, jax.ShapeDtypeStruct(info.shape, spec.dtype))
            if len(grid.shape) != 4 or grid.shape[0] != info.shape[0]:
                raise ValueError(
                    f"reshape must turn layer {info.name!r}'s output {info.shape} into (batch, height, width, "
                    f"channels); it gave {grid.shape}"
                )
    output = jax.eval_shape(lambda v, x: explainer.output_fn(model.apply(v, x)), variables_key.tree, spec)
    head_name, head_features = None, "identity"
    if method.needs_head:
        example = variables if variables is not None else explainer.example_variables
        if example is None:
            example = model.example_variables(spec)
        for info in layer_infos:
            head_name, head_features = _find_head(model, example, layers, info, explainer.head, spec)
    biased = model.bias_layers(variables_key, spec) if "bias_gradients" in method.inputs else ()
    planned = _Planned(tuple(info.name for info in layer_infos), head_name, head_features, biased, tuple(output.shape))
    _PLANS[cache_key] = planned
    return planned


def _plan_attention(
    explainer: Explainer,
    layers: list[LayerInfo],
    requested: list,
    variables_key: Any,
    spec: jax.ShapeDtypeStruct,
    cache_key: tuple,
) -> _Planned:
    """An attention method's blocks (``layer=``, default: every block), their attention layers and the
    patch grid: ``reshape=`` or, as torchcam, one prefix token and a square grid."""
    blocks, attention = resolve_attention_blocks(layers, requested, explainer.method.name)
    keys = attention[0].shape[-1]
    reshape = explainer.reshape
    if reshape is None:
        side = math.isqrt(keys - 1)
        if keys < 2 or side * side != keys - 1:
            raise LayerError(
                f"{explainer.method.name}: the attention of {attention[0].name!r} has {keys} keys, not one class "
                "token and a square patch grid; pass reshape=flaxcam.models.token_grid((h, w), prefix_tokens)"
            )
        from flaxcam.models.vit import TokenGrid  # the models package is imported on demand only

        reshape = TokenGrid((side, side), 1)
    grid = jax.eval_shape(reshape, jax.ShapeDtypeStruct((spec.shape[0], keys, 1), spec.dtype))
    if len(grid.shape) != 4 or grid.shape[0] != spec.shape[0] or grid.shape[-1] != 1:
        raise ValueError(
            f"reshape must turn the {keys} key tokens of {attention[0].name!r}, (batch, {keys}, 1), into "
            f"(batch, height, width, 1); it gave {grid.shape}"
        )
    output = jax.eval_shape(lambda v, x: explainer.output_fn(explainer.model.apply(v, x)), variables_key.tree, spec)
    planned = _Planned(
        tuple(info.name for info in blocks),
        None,
        "identity",
        (),
        tuple(output.shape),
        attention=tuple(info.name for info in attention),
        reshape=reshape,
    )
    _PLANS[cache_key] = planned
    return planned


def _find_head(
    model: Any, variables: Any, layers: list[LayerInfo], layer: LayerInfo, head: str | None, spec: jax.ShapeDtypeStruct
) -> tuple[str, str]:
    """The Dense / Linear layer after global pooling that CAM takes its weights from, and whether the
    pooling reads the layer's output as is (``"identity"``) or after a ReLU (``"relu"``); checked
    numerically."""
    dense = [info for info in layers if info.module_type in HEAD_TYPES]
    if head is None:
        if not dense:
            raise LayerError(
                "CAM needs a global pooling → Dense head, but the model calls no nn.Dense (nnx.Linear); use a "
                "gradient method such as 'gradcam' instead"
            )
        head = dense[-1].name
    elif head not in {info.name for info in layers}:
        raise LayerError(f"unknown head {head!r}; Dense layers of this model: {[i.name for i in dense]}")
    try:
        with jax.ensure_compile_time_eval():
            kernel = model.head_kernel(variables, head)
    except (KeyError, TypeError, AttributeError):
        raise LayerError(f"head {head!r} has no params/kernel; Dense layers: {[i.name for i in dense]}") from None
    channels = layer.shape[-1]
    if kernel.ndim != 2 or kernel.shape[0] != channels:
        raise LayerError(
            f"CAM needs the layer that feeds global pooling → Dense: layer {layer.name!r} has {channels} "
            f"channels but head {head!r} has a kernel of shape {tuple(kernel.shape)}; "
            f"{_which_layer_feeds(layers, kernel.shape[0])}use a gradient method such as 'gradcam' for other layers"
        )
    features = _head_features(model, variables, layer.name, head, spec)
    if features is None:
        raise LayerError(
            f"CAM needs the layer that feeds global pooling → Dense: the input of head {head!r} is neither "
            f"the global average or max of layer {layer.name!r}'s output (or of its ReLU); "
            f"{_which_layer_feeds(layers, kernel.shape[0])}use a gradient method such as 'gradcam' instead"
        )
    return head, features


def _which_layer_feeds(layers: list[LayerInfo], channels: int) -> str:
    candidates = [info.name for info in layers if info.is_spatial and info.shape[-1] == channels]
    return f"layers with {channels} channels: {candidates[-3:]}; " if candidates else ""


def _head_features(model: Any, variables: Any, layer: str, head: str, spec: jax.ShapeDtypeStruct) -> str | None:
    """``"identity"`` / ``"relu"`` if the head's input is the global average or max pooling of the layer's
    output (or of its ReLU), else None. Evaluated once per model, layer, head and input shape, on two
    random images with the given weights."""
    key = (model, layer, head, tuple(spec.shape[1:]), jnp.dtype(spec.dtype), shape_key(variables))
    if key not in _HEAD_FEATURES:
        forward = jax.jit(lambda v, x: forward_at_layer(model, v, x, layer, None, (), head))
        # Outside any trace the jitted forward is simply called: one compilation. Planned inside a trace
        # (an explainer called under the user's jit), it must be evaluated eagerly to give numbers, at
        # the price of evaluating flax's parameter-shape checks op by op (one small compilation per
        # parameter: about half a minute for EfficientNet-Lite0 on a CPU), so only there.
        eager = jax.ensure_compile_time_eval() if _under_trace() else contextlib.nullcontext()
        with eager:
            images = jax.random.normal(jax.random.key(0), (2, *spec.shape[1:]), spec.dtype)
            _, activations, head_input = forward(variables, images)
            _HEAD_FEATURES[key] = _pooling_relation(
                np.asarray(activations, np.float64), np.asarray(head_input, np.float64)
            )
    return _HEAD_FEATURES[key]


def _under_trace() -> bool:
    """Whether this code runs while a function is being traced (new values are then tracers)."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _pooling_relation(activations: np.ndarray, head_input: np.ndarray) -> str | None:
    head_input = head_input.reshape(head_input.shape[0], -1)
    scale = np.abs(head_input).max() + 1e-12
    for features, transformed in (("identity", activations), ("relu", np.maximum(activations, 0.0))):
        for pool in (np.mean, np.max):
            pooled = pool(transformed, axis=(1, 2))
            if pooled.shape == head_input.shape and np.abs(pooled - head_input).max() <= 1e-4 * scale:
                return features
    return None


def explainer(
    model: Any,
    *,
    method: str = "gradcam",
    layer: str | Sequence[str] | None = None,
    targets: Any = None,
    top_k: int | None = None,
    score: str = "logit",
    head: str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    output_fn: OutputFn | None = None,
    reshape: Callable[[Array], Array] | None = None,
    method_options: Mapping[str, Any] | None = None,
    eigen_smooth: bool = False,
    chunk_size: int = 32,
    aug_smooth: bool = False,
) -> Explainer:
    """Plan an explanation once; return the pure step ``fn(variables, images, targets=None, key=None,
    image_ids=None) -> Explanation``.

    Args are those of :func:`flaxcam.explain`, except ``targets``, which gives the *kind* of target:
    ``None`` (each image's top class; or ``top_k=k``), ``"classes"`` (pass ``(B,)`` / ``(B, T)`` class
    indices to each call), a :class:`~flaxcam.targets.Binary` / ``Segmentation`` / ``Embedding`` (its
    data is the default; a call may pass another of the same kind), or a callable
    ``scores(output) -> (B,)`` / ``(B, T)``.

    ``model`` is a linen module (``fn`` takes its variables) or an NNX module (``fn`` takes its state,
    ``nnx.state(model)``, or any state of the same graph; the module itself is never modified). An NNX
    model must be in eval mode (``model.eval()``).

    Example::

        fn = flaxcam.explainer(model, method="gradcam", layer="layer4")
        maps = jax.jit(fn)(variables, images).maps                       # one compile per shape
        ensemble = jax.vmap(fn, in_axes=(0, None))(stacked_variables, images)  # weight ensembles
    """
    chosen = get_method(method)
    options = check_method_options(chosen, method_options)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if score not in CLASS_SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, CLASS_SCORES))}, got {score!r}")
    if targets is not None and top_k is not None:
        raise ValueError("pass either targets= or top_k=, not both")
    requested = [layer] if layer is None or isinstance(layer, str) else list(layer)
    if not requested:
        raise ValueError("layer= must name at least one layer")
    if chosen.attention_layers and (aug_smooth or eigen_smooth):
        raise ValueError(f"{chosen.name} takes no aug_smooth= or eigen_smooth= (it reads attention, not a feature map)")
    if reshape is not None and None in requested and not chosen.attention_layers:
        raise ValueError("with reshape=, name the layer(s) whose output it turns into a grid (layer=...)")
    if chosen.bias_layers and (layer is not None or reshape is not None or eigen_smooth):
        raise ValueError(
            f"{chosen.name} reads the input and every biased conv / BatchNorm layer: it takes no "
            "layer=, reshape= or eigen_smooth="
        )
    if reshape is not None and chosen.name == "ablationcam":
        raise ValueError("ablationcam does not support reshape= yet (it ablates channels of the layer output)")
    if aug_smooth and isinstance(targets, Segmentation):
        raise ValueError("aug_smooth does not support Segmentation targets yet (the masks would need flipping)")
    if not (
        targets is None
        or targets == "classes"
        or isinstance(targets, (Binary, Segmentation, Embedding))
        or callable(targets)
    ):
        raise ValueError(
            "explainer(targets=) takes None, 'classes', a Binary / Segmentation / Embedding target or a "
            f"callable; got {targets!r} (pass the classes themselves to each call)"
        )
    call_kwargs = tuple(sorted((apply_kwargs or {}).items()))
    if is_nnx(model):
        adapter, example, _ = split_nnx(model, call_kwargs)
    else:
        adapter, example = as_model(model, call_kwargs), None
    return Explainer(
        adapter,
        chosen,
        layer if layer is None or isinstance(layer, str) else tuple(layer),
        top_k,
        score,
        head,
        output_fn or default_output_fn,
        reshape,
        options,
        eigen_smooth,
        chunk_size,
        aug_smooth,
        targets,
        example,
    )
