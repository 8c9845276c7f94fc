"""``explain``: probe → method → post-processing, one jitted, vmapped, sharded step per batch shape."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcam import ops
from flaxcam.methods import LAYER_FUSIONS, REDUCTIONS, Method, get_method
from flaxcam.methods.guided import GuidedModel
from flaxcam.volumes import check_volumetric
from flaxcam.probe import (
    BiasLayer,
    LayerError,
    LayerInfo,
    OutputFn,
    bias_layers,
    default_output_fn,
    derivative_diagonals,
    effective_bias,
    forward_at_layer,
    forward_at_layers,
    input_and_layer_gradients,
    list_layers,
    probe,
    probe_hessian,
    resolve_layer,
    shape_key,
)
from flaxcam.targets import Segmentation, TargetSpec, resolve_targets, select_classes, target_scores

Array = jax.Array

#: Number of times the explain step has been traced (compiled); tests use it to prove that ragged
#: batch sizes reuse one program.
TRACE_COUNT = 0


@struct.dataclass
class Explanation:
    """The result of :func:`explain` for a batch of ``B`` images with ``T`` targets each.

    Attributes:
      maps: ``(B, T, H, W)`` maps at the input resolution in [0, 1]: ``low_res`` resized bilinearly
        (half-pixel centres, as ``cv2.resize``) and min-max normalized again, as pytorch-grad-cam does.
      low_res: ``(B, T, h, w)`` maps at the layer's resolution: ReLU, then per-map min-max normalization
        ``(m - min) / (1e-7 + max(m - min))`` (a constant map gives zeros, never NaN).
      raw: ``(B, T, h, w)`` the method's output before ReLU and normalization.
        With several layers, ``low_res`` and ``raw`` are tuples (one array per layer, in order) and
        ``maps`` fuses them: the mean of the per-layer upsampled maps, normalized again.
        FullGrad has no layer resolution: ``raw`` is its map at the input resolution and ``low_res``
        equals ``maps``; its ``layer`` is ``"input+biases"``.
      logits: ``(B, K)`` model outputs; ``probabilities``: their softmax.
      targets: ``(B, T)`` int32 class index explained by each map; ``scores``: ``(B, T)`` their logits.
      method, layer: what produced the maps.
    """

    maps: Array
    low_res: Array
    raw: Array
    logits: Array
    probabilities: Array
    targets: Array
    scores: Array
    method: str = struct.field(pytree_node=False)
    layer: str | tuple[str, ...] = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class _StepConfig:
    model: nn.Module
    method: Method
    layers: tuple[str, ...]
    head: str | None
    head_features: str  # "identity" or "relu": what the head's global pooling reads of the layer output
    target_spec: TargetSpec
    apply_kwargs: tuple
    output_fn: OutputFn
    eigen_smooth: bool = False
    chunk_size: int = 32
    aug_smooth: bool = False
    reshape: Callable[[Array], Array] | None = None
    method_options: tuple = ()  # sorted (name, value) pairs passed to the method function
    biased: tuple[BiasLayer, ...] = ()  # FullGrad's layers


def _contributions(
    config: _StepConfig,
    variables: Any,
    images: Array,
    activations: Array,
    gradients: Array | None,
    chosen: Array,
    key: Array | None,
    target_data: dict[str, Array] | None = None,
    layer: str = "",
    scores: Array | None = None,
    per_target: dict[str, Array] | None = None,
) -> Array:
    """The method's per-channel contributions ``(B, T, h, w, C)``. ``per_target`` holds more
    ``(B, T, h, w, C)`` inputs (higher derivatives), passed to the methods that ask for them."""
    method = config.method
    if method.batched:
        available = {
            "activations": activations,
            "images": images,
            "scores": scores,
            "score": _input_scorer(config, variables, chosen, target_data),
            "ablate": _ablation_scorer(config, variables, images, layer, chosen, target_data),
            "key": key,
            "probe_at": _input_prober(config, variables, layer, chosen, target_data),
        }
        if "softmax_score" in method.inputs:  # meta-methods (SESS): class probabilities, base-method maps
            available["softmax_score"] = _input_scorer(config, variables, chosen, target_data, "softmax")
        if "explain_at" in method.inputs:
            available["explain_at"] = _base_explainer(config, variables, chosen, target_data)
        options = dict(config.method_options)
        if "chunk_size" in inspect.signature(method.fn).parameters:
            options["chunk_size"] = config.chunk_size
        return method.fn(**{name: available[name] for name in method.inputs}, **options)

    batch, num_targets = chosen.shape
    inputs: dict[str, Array] = {}
    axes: dict[str, int | None] = {}
    if "activations" in method.inputs:
        inputs["activations"], axes["activations"] = activations, None  # shared by the T targets
    if "gradients" in method.inputs:
        inputs["gradients"], axes["gradients"] = gradients, 0  # (B, T, h, w, C)
    if "class_weights" in method.inputs:
        kernel = _head_kernel(variables, config.head)  # (C, K)
        if config.head_features == "relu":  # conv → ReLU (as a function) → pooling → Dense
            inputs["activations"] = jax.nn.relu(activations)
        inputs["class_weights"], axes["class_weights"] = kernel.T[chosen], 0  # (B, T, C)
    for name, value in (per_target or {}).items():
        if name in method.inputs:
            inputs[name], axes[name] = value, 0
    if "key" in method.inputs:
        inputs["key"], axes["key"] = jax.random.split(key, batch * num_targets).reshape(batch, num_targets), 0

    options = dict(config.method_options)

    def per_image(image_inputs: dict[str, Array]) -> Array:
        over_targets = jax.vmap(lambda kw: method.fn(**kw, **options), in_axes=(axes,), axis_size=num_targets)
        return over_targets(image_inputs)

    return jax.vmap(per_image)(inputs)


def _fixed_targets(config: _StepConfig, chosen: Array, target_data: dict | None) -> tuple[TargetSpec, dict]:
    """The targets with the labels already chosen on the original images, to score new inputs with."""
    spec = config.target_spec
    if spec.kind in ("argmax", "top_k", "classes"):
        spec = TargetSpec("classes", spec.count, spec.score)
    return spec, {**(target_data or {}), "classes": chosen}


def _input_scorer(
    config: _StepConfig, variables: Any, chosen: Array, target_data: dict | None, score: str | None = None
) -> Callable:
    """``score(new_images, image_index) -> (n, T)``: the targets of images ``image_index`` evaluated on
    new inputs (e.g. masked copies); class targets scored by ``score`` (``"softmax"``, ...) if given."""
    spec, data = _fixed_targets(config, chosen, target_data)
    if score is not None and spec.kind == "classes":
        spec = TargetSpec("classes", spec.count, score)

    def score(new_images: Array, image_index: Array) -> Array:
        output = config.output_fn(config.model.apply(variables, new_images, **dict(config.apply_kwargs)))
        return target_scores(spec, output, {name: value[image_index] for name, value in data.items()})[0]

    return score


def _base_explainer(config: _StepConfig, variables: Any, chosen: Array, target_data: dict | None) -> Callable:
    """``explain_at(new_images, image_index) -> (n, T, H', W')``: the maps of the meta-method's ``base``
    method (option) for new inputs (e.g. patches) with the targets of images ``image_index``."""
    spec, data = _fixed_targets(config, chosen, target_data)
    base_name = {**config.method.options, **dict(config.method_options)}["base"]

    def explain_at(new_images: Array, image_index: Array) -> Array:
        base = dataclasses.replace(config, method=get_method(base_name), method_options=(), target_spec=spec)
        selected = {name: value[image_index] for name, value in data.items()}
        return _run(base, variables, new_images, lambda out: target_scores(spec, out, selected), None, selected)["maps"]

    return explain_at


def _ablation_scorer(
    config: _StepConfig, variables: Any, images: Array, layer: str, chosen: Array, target_data: dict | None
) -> Callable:
    """``ablate(delta, image_index) -> (n, T)``: the targets of images ``image_index`` with ``delta``
    added to ``layer``'s output (a forward pass of the whole network per row)."""
    spec, data = _fixed_targets(config, chosen, target_data)

    def ablate(delta: Array, image_index: Array) -> Array:
        output, _, _ = forward_at_layers(
            config.model, variables, images[image_index], (layer,), (delta,), config.apply_kwargs
        )
        output = config.output_fn(output)
        return target_scores(spec, output, {name: value[image_index] for name, value in data.items()})[0]

    return ablate


def _input_prober(
    config: _StepConfig, variables: Any, layer: str, chosen: Array, target_data: dict | None
) -> Callable:
    """``probe_at(new_images) -> (activations (B, h, w, C), gradients (B, T, h, w, C))`` at ``layer``
    for a new batch standing for the images (e.g. noisy copies), with the targets chosen on the
    originals; ``reshape`` applied as for the images themselves."""
    spec, data = _fixed_targets(config, chosen, target_data)

    def probe_at(new_images: Array) -> tuple[Array, Array]:
        _, activations, gradients, _, _ = probe(
            config.model, variables, new_images, layer, lambda output: target_scores(spec, output, data),
            apply_kwargs=config.apply_kwargs, output_fn=config.output_fn,
        )
        if config.reshape is not None:
            activations = config.reshape(activations)
            gradients = jax.vmap(config.reshape, in_axes=1, out_axes=1)(gradients)
        return activations, gradients

    return probe_at


def _reduce(contributions: Array, reduction: str) -> Array:
    """``(B, T, h, w, C)`` contributions → ``(B, T, h, w)`` maps: channel sum or a projection
    (:data:`flaxcam.methods.REDUCTIONS`)."""
    if reduction == "sum":
        return jnp.sum(contributions, axis=-1)
    return jax.vmap(jax.vmap(REDUCTIONS[reduction]))(contributions)


#: pytorch-grad-cam's default test-time augmentation for ``aug_smooth``: horizontal flip × input
#: multiplied by 0.9, 1, 1.1 (ttach's ``HorizontalFlip`` and ``Multiply``). Index 1 is the identity.
AUG_SMOOTH_TRANSFORMS: tuple[tuple[bool, float], ...] = tuple(
    (flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)
)


def _run(
    config: _StepConfig,
    variables: Any,
    images: Array,
    score_fn: Callable[[Array], tuple[Array, Array]],
    key: Array | None,
    target_data: dict[str, Array] | None,
) -> dict[str, Any]:
    """Forward (+ backward) once, then the method at every layer; maps fused over layers as
    pytorch-grad-cam aggregates them: mean of the per-layer upsampled maps, normalized again."""
    method = config.method
    if method.score_transform is not None:
        score_fn = _transformed_scores(score_fn, method.score_transform)
    if method.bias_layers:
        return _run_bias_layers(config, variables, images, score_fn)
    probe_kwargs = {"apply_kwargs": config.apply_kwargs, "output_fn": config.output_fn}
    extras: dict[str, tuple[Array, ...]] = {}
    if "hvp" in method.inputs:
        logits, activations, gradients, extras["hvp"], scores, chosen = probe_hessian(
            config.model, variables, images, config.layers, score_fn, **probe_kwargs
        )
    else:
        logits, activations, gradients, scores, chosen = probe(
            config.model, variables, images, config.layers, score_fn, with_gradients=method.needs_gradients, **probe_kwargs
        )
    if "second_derivatives" in method.inputs:
        extras["second_derivatives"], extras["third_derivatives"] = derivative_diagonals(
            config.model, variables, images, config.layers, score_fn, chunk_size=config.chunk_size, **probe_kwargs
        )
    raws, lows, upsampled = [], [], []
    for index in range(len(config.layers)):
        layer_key = None if key is None else jax.random.fold_in(key, index)
        layer_activations = activations[index]
        layer_gradients = None if gradients is None else gradients[index]
        per_target = {name: values[index] for name, values in extras.items()}
        if config.reshape is not None:  # e.g. ViT tokens (B, N, D) -> grid (B, h, w, D)
            layer_activations = config.reshape(layer_activations)
            per_target_reshape = jax.vmap(config.reshape, in_axes=1, out_axes=1)  # (B, T, N, D) -> (B, T, h, w, D)
            if layer_gradients is not None:
                layer_gradients = per_target_reshape(layer_gradients)
            per_target = {name: per_target_reshape(values) for name, values in per_target.items()}
        contributions = _contributions(
            config, variables, images, layer_activations, layer_gradients, chosen, layer_key, target_data,
            config.layers[index], scores, per_target,
        )
        reduction = "projection" if config.eigen_smooth and method.reduction == "sum" else method.reduction
        raw = _reduce(contributions, reduction)  # (B, T, h, w) or volumes (B, T, d, h, w)
        low_res = ops.minmax_normalize(jax.nn.relu(raw), spatial=images.ndim - 2)
        raws.append(raw)
        lows.append(low_res)
        upsampled.append(ops.resize_maps(low_res, images.shape[1:-1]))
    single = len(config.layers) == 1
    return {
        "maps": LAYER_FUSIONS[method.layer_fusion](upsampled, spatial=images.ndim - 2),
        "low_res": lows[0] if single else tuple(lows),
        "raw": raws[0] if single else tuple(raws),
        "logits": logits,
        "targets": chosen,
        "scores": scores,
    }


def _transformed_scores(score_fn: Callable, transform: Callable) -> Callable:
    """``score_fn`` with its class scores replaced by ``transform(output, classes)`` (FinerCAM)."""

    def transformed(output: Array) -> tuple[Array, Array]:
        _, chosen = score_fn(output)
        return transform(output, chosen), chosen

    return transformed


def _run_bias_layers(
    config: _StepConfig, variables: Any, images: Array, score_fn: Callable[[Array], tuple[Array, Array]]
) -> dict[str, Any]:
    """FullGrad: gradients w.r.t. the input and every biased layer from one backward pass, the method's
    map at the input resolution (per image and target), then normalization."""
    logits, scores, chosen, input_gradients, layer_gradients = input_and_layer_gradients(
        GuidedModel(config.model) if config.method.guided else config.model,
        variables,
        images,
        tuple(layer.name for layer in config.biased),
        score_fn,
        apply_kwargs=config.apply_kwargs,
        output_fn=config.output_fn,
    )
    biases = tuple(effective_bias(variables, layer) for layer in config.biased)
    for layer, bias, gradient in zip(config.biased, biases, layer_gradients):
        if bias.shape != gradient.shape[-1:]:
            raise LayerError(f"layer {layer.name!r}: bias of shape {bias.shape} does not match its output {gradient.shape[2:]}")

    def per_target(image: Array, input_gradient: Array, gradients: tuple[Array, ...]) -> Array:
        available = {"images": image, "input_gradients": input_gradient, "bias_gradients": gradients, "biases": biases}
        return config.method.fn(**{name: available[name] for name in config.method.inputs})

    per_image = jax.vmap(per_target, in_axes=(None, 0, 0))  # over the T targets
    raw = jax.vmap(per_image)(images, input_gradients, layer_gradients)  # (B, T, H, W)
    maps = ops.minmax_normalize(jax.nn.relu(raw))
    return {"maps": maps, "low_res": maps, "raw": raw, "logits": logits, "targets": chosen, "scores": scores}


def _explain_step(
    config: _StepConfig, variables: Any, images: Array, target_data: dict[str, Array] | None, key: Array | None
) -> dict[str, Any]:
    global TRACE_COUNT
    TRACE_COUNT += 1
    if not config.aug_smooth:
        out = _run(config, variables, images, lambda out: target_scores(config.target_spec, out, target_data), key, target_data)
    else:
        out = _aug_smooth(config, variables, images, target_data, key)
    out["probabilities"] = jax.nn.softmax(out["logits"], axis=-1)
    return out


def _aug_smooth(config: _StepConfig, variables: Any, images: Array, target_data: dict | None, key: Array | None) -> dict:
    """Mean of the maps of the flipped / scaled copies of each image, mapped back (flips undone).

    Unlike pytorch-grad-cam, whose default targets are re-chosen per augmented copy, the targets are
    chosen once on the unaugmented image and explained in every copy.
    """
    copies = len(AUG_SMOOTH_TRANSFORMS)
    identity = AUG_SMOOTH_TRANSFORMS.index((False, 1.0))
    batch = images.shape[0]
    augmented = jnp.concatenate(
        [(images[:, :, ::-1] if flip else images) * factor for flip, factor in AUG_SMOOTH_TRANSFORMS]
    )

    spec = config.target_spec
    tiled = None if target_data is None else jax.tree_util.tree_map(lambda v: jnp.concatenate([v] * copies), target_data)

    def score_fn(output):
        if not spec.chosen_from_output:
            return target_scores(spec, output, tiled)
        own = select_classes(spec, output.reshape(copies, batch, -1)[identity], None)
        return target_scores(TargetSpec("classes", spec.count, spec.score), output, {"classes": jnp.tile(own, (copies, 1))})

    out = _run(config, variables, augmented, score_fn, key, tiled)

    def mean_over_copies(maps: Array) -> Array:
        per_copy = maps.reshape(copies, batch, *maps.shape[1:])
        restored = [per_copy[i][..., ::-1] if flip else per_copy[i] for i, (flip, _) in enumerate(AUG_SMOOTH_TRANSFORMS)]
        return sum(restored) / copies

    def identity_copy(values: Array) -> Array:
        return values.reshape(copies, batch, *values.shape[1:])[identity]

    return {
        "maps": mean_over_copies(out["maps"]),
        "low_res": jax.tree_util.tree_map(mean_over_copies, out["low_res"]),
        "raw": jax.tree_util.tree_map(mean_over_copies, out["raw"]),
        "logits": identity_copy(out["logits"]),
        "targets": identity_copy(out["targets"]),
        "scores": identity_copy(out["scores"]),
    }


_jitted_step = jax.jit(_explain_step, static_argnums=0)


def _head_kernel(variables: Mapping[str, Any], head: str | None) -> Array:
    node: Any = variables["params"]
    for part in (head or "").split("."):
        node = node[part]
    return node["kernel"]


def _replicated_variables(variables: Any, devices: list[jax.Device], replicated: NamedSharding) -> Any:
    """``variables`` on every device: as they are when there is one device and every leaf already
    lives there (the common case; saves a per-leaf ``device_put`` on every call), else ``device_put``."""
    if len(devices) == 1:
        leaves = jax.tree_util.tree_leaves(variables)
        if all(isinstance(leaf, jax.Array) and leaf.sharding.device_set == {devices[0]} for leaf in leaves):
            return variables
    return jax.device_put(variables, replicated)


def bucket_size(batch: int, multiple_of: int = 1) -> int:
    """Padded batch size: the next power of two up to 256, then the next multiple of 256; always a
    multiple of ``multiple_of`` (the number of devices the batch is sharded over)."""
    size = 1 << max(0, (batch - 1).bit_length()) if batch <= 256 else -(-batch // 256) * 256
    return -(-size // multiple_of) * multiple_of


def _find_head(
    model: nn.Module,
    variables: Mapping[str, Any],
    layers: list[LayerInfo],
    layer: LayerInfo,
    head: str | None,
    images: Array,
    apply_kwargs: tuple,
) -> tuple[str, str]:
    """The Dense layer after global pooling that CAM takes its weights from, and whether the pooling
    reads the layer's output as is (``"identity"``) or after a ReLU (``"relu"``); checked numerically."""
    dense = [info for info in layers if info.module_type == "Dense"]
    if head is None:
        if not dense:
            raise LayerError(
                "CAM needs a global pooling → Dense head, but the model calls no nn.Dense; use a gradient "
                "method such as 'gradcam' instead"
            )
        head = dense[-1].name
    elif head not in {info.name for info in layers}:
        raise LayerError(f"unknown head {head!r}; Dense layers of this model: {[i.name for i in dense]}")
    try:
        kernel = _head_kernel(variables, head)
    except (KeyError, TypeError):
        raise LayerError(f"head {head!r} has no params/kernel; Dense layers: {[i.name for i in dense]}") from None
    channels = layer.shape[-1]
    if kernel.ndim != 2 or kernel.shape[0] != channels:
        raise LayerError(
            f"CAM needs the layer that feeds global pooling → Dense: layer {layer.name!r} has {channels} "
            f"channels but head {head!r} has a kernel of shape {tuple(kernel.shape)}; "
            f"{_which_layer_feeds(layers, kernel.shape[0])}use a gradient method such as 'gradcam' for other layers"
        )
    features = _head_features(model, variables, layer.name, head, images.shape[1:], images.dtype, apply_kwargs)
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


#: Result of the one-off CAM head check, keyed by model, layer, head, input shape and the *structure*
#: of the variables (not their identity): whether a head reads the pooled layer output is a property of
#: the architecture, so new weights or a rebuilt variables dict of the same model reuse the result.
_HEAD_FEATURES: dict[tuple, str | None] = {}


def _head_features(model, variables, layer, head, image_shape, dtype, apply_kwargs) -> str | None:
    """``"identity"`` / ``"relu"`` if the head's input is the global average or max pooling of the layer's
    output (or of its ReLU), else None. Evaluated once per model, layer, head and input shape, on two
    random images with the given weights."""
    key = (model, layer, head, tuple(image_shape), jnp.dtype(dtype), apply_kwargs, shape_key(variables))
    if key not in _HEAD_FEATURES:
        images = jax.random.normal(jax.random.key(0), (2, *image_shape), dtype)
        _, activations, head_input = jax.jit(
            lambda v, x: forward_at_layer(model, v, x, layer, None, apply_kwargs, head)
        )(variables, images)
        _HEAD_FEATURES[key] = _pooling_relation(np.asarray(activations, np.float64), np.asarray(head_input, np.float64))
    return _HEAD_FEATURES[key]


def _pooling_relation(activations: np.ndarray, head_input: np.ndarray) -> str | None:
    head_input = head_input.reshape(head_input.shape[0], -1)
    scale = np.abs(head_input).max() + 1e-12
    for features, transformed in (("identity", activations), ("relu", np.maximum(activations, 0.0))):
        for pool in (np.mean, np.max):
            pooled = pool(transformed, axis=(1, 2))
            if pooled.shape == head_input.shape and np.abs(pooled - head_input).max() <= 1e-4 * scale:
                return features
    return None


@functools.lru_cache(maxsize=64)
def _output_shape(model, variables_key, spec, apply_kwargs, output_fn) -> tuple[int, ...]:
    """Shape of the (selected) model output (shape-only trace, cached per model and input shape)."""
    output = jax.eval_shape(lambda v, x: output_fn(model.apply(v, x, **dict(apply_kwargs))), variables_key.tree, spec)
    return tuple(output.shape)


def _check_method_options(method: Method, options: Mapping[str, Any] | None) -> tuple:
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
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"option {name}={value!r} of method {method.name!r} must be a non-negative number")
            options[name] = float(value)
    return tuple(sorted(options.items()))


def _as_images(images: Any) -> Array | np.ndarray:
    if not hasattr(images, "ndim"):
        images = np.asarray(images)
    if images.ndim not in (4, 5):
        raise ValueError(
            f"images must be a (batch, height, width, channels) array (or (batch, depth, height, width, "
            f"channels) volumes), got shape {tuple(images.shape)}; add a batch axis for a single image"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point (preprocessed as the model expects), got dtype {images.dtype}"
        )
    return images


def _pad_batch(array: Any, size: int) -> Any:
    if array.shape[0] == size:
        return array
    pad = [(0, size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, pad) if isinstance(array, np.ndarray) else jnp.pad(array, pad)


def explain(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Any,
    *,
    method: str = "gradcam",
    layer: str | Sequence[str] | None = None,
    targets: int | Sequence[int] | np.ndarray | None = None,
    top_k: int | None = None,
    head: str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    output_fn: OutputFn | None = None,
    devices: Sequence[jax.Device] | None = None,
    eigen_smooth: bool = False,
    key: Array | None = None,
    chunk_size: int = 32,
    aug_smooth: bool = False,
    score: str = "logit",
    reshape: Callable[[Array], Array] | None = None,
    method_options: Mapping[str, Any] | None = None,
) -> Explanation:
    """Explain a batch of images with one jitted call.

    Args:
      model: any Flax linen module; ``model.apply(variables, images, **apply_kwargs)`` must return
        logits ``(B, K)`` (or pass ``output_fn`` to pick them from a richer output).
      variables: the model's variables (``params``, ``batch_stats``, ...).
      images: ``(B, H, W, C)`` float array, preprocessed as the model expects. Any ``H, W``.
      method: ``"gradcam"`` (default) or ``"cam"``; see :data:`flaxcam.METHODS`.
      layer: dotted name of the target layer (``"layer4"``, ``"layer3.1"``), or several names to fuse
        (one forward/backward pass for all); default: the last submodule with a ``(B, h, w, C)``
        output. An unknown name raises an error listing the valid ones.
      targets: ``None`` (each image's top class), one class for all, one class per image, a
        ``(B, T)`` array of classes, or a :class:`flaxcam.targets.Binary`, ``Segmentation`` or
        ``Embedding`` target for other kinds of output.
      score: for class targets, explain the ``"logit"`` (default), the ``"softmax"`` probability or
        the ``"rest"`` score (logit minus cross-entropy, :func:`flaxcam.targets.rest_scores`).
      reshape: turns a non-spatial layer output into ``(B, h, w, C)`` — e.g. a ViT's ``(B, 1 + hw, D)``
        tokens without the class token — applied to activations and gradients alike (pytorch-grad-cam's
        ``reshape_transform``); pass a module-level function so it is hashed once.
      top_k: explain each image's ``k`` highest-scoring classes (``T = k``), from one forward pass.
      head: for CAM, the Dense layer after global pooling (default: the last ``nn.Dense`` called).
      apply_kwargs: extra keyword arguments of ``model.apply`` (e.g. ``{"train": False}``).
      devices: devices to shard the batch over (default: all local devices).
      eigen_smooth: reduce each method's per-channel contributions by their first principal
        component instead of their sum (pytorch-grad-cam's ``eigen_smooth``; deterministic sign).
      key: PRNG key of the stochastic methods (default ``jax.random.key(0)``): same key, same maps.
        Layer ``i`` of a call draws from ``jax.random.fold_in(key, i)``.
      chunk_size: masked images per forward pass of the score-based methods (bounds their memory).
      aug_smooth: average the maps over horizontal flips × input scaled by 0.9 / 1 / 1.1 (6 copies,
        batched in the same call; pytorch-grad-cam's ``aug_smooth``).
      method_options: keyword options of the method, e.g. ``{"num_samples": 8, "std": 0.5}`` for
        ``"sscam"`` or ``{"top_channels": 32}`` for ``"faster_scorecam"`` (``METHODS[name].options``
        lists them with their defaults); an unknown name raises an error listing the valid ones.

    Returns:
      An :class:`Explanation` with ``maps`` of shape ``(B, T, H, W)``.

    The batch is padded to :func:`bucket_size` so ragged batch sizes reuse one compiled program, and
    sharded over ``devices`` along the batch axis.
    """
    images = _as_images(images)
    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    output_fn = output_fn or default_output_fn
    chosen_method = get_method(method)
    options = _check_method_options(chosen_method, method_options)
    variables_key = shape_key(variables)  # structure and shapes, computed once per call
    layers = list_layers(model, variables_key, images, kwargs)
    requested = [layer] if layer is None or isinstance(layer, str) else list(layer)
    if not requested:
        raise ValueError("layer= must name at least one layer")
    if reshape is not None and None in requested:
        raise ValueError("with reshape=, name the layer(s) whose output it turns into a grid (layer=...)")
    if chosen_method.bias_layers:
        if layer is not None or reshape is not None or eigen_smooth:
            raise ValueError(
                f"{chosen_method.name} reads the input and every biased conv / BatchNorm layer: it takes no "
                "layer=, reshape= or eigen_smooth="
            )
        requested = []
    layer_infos = [resolve_layer(layers, name, spatial_only=reshape is None) for name in requested]
    check_volumetric(chosen_method, layer_infos, images, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    if reshape is not None:
        if chosen_method.name == "ablationcam":
            raise ValueError("ablationcam does not support reshape= yet (it ablates channels of the layer output)")
        for info in layer_infos:
            grid = jax.eval_shape(reshape, jax.ShapeDtypeStruct(info.shape, images.dtype))
            if len(grid.shape) != 4 or grid.shape[0] != info.shape[0]:
                raise ValueError(
                    f"reshape must turn layer {info.name!r}'s output {info.shape} into (batch, height, width, "
                    f"channels); it gave {grid.shape}"
                )

    batch = images.shape[0]
    output_shape = _output_shape(model, variables_key, jax.ShapeDtypeStruct(images.shape, images.dtype), kwargs, output_fn)
    spec, target_data = resolve_targets(targets, top_k, batch, output_shape, score)
    if chosen_method.score_transform is not None and (spec.kind not in ("argmax", "classes", "top_k") or spec.score != "logit"):
        raise ValueError(f"{chosen_method.name} needs class targets scored by their logit (score='logit')")
    if aug_smooth and isinstance(targets, Segmentation):
        raise ValueError("aug_smooth does not support Segmentation targets yet (the masks would need flipping)")
    head_name, head_features = None, "identity"
    if chosen_method.needs_head:
        for layer_info in layer_infos:
            head_name, head_features = _find_head(model, variables, layers, layer_info, head, images, kwargs)

    devices = list(devices) if devices is not None else jax.local_devices()
    padded = bucket_size(batch, len(devices))
    mesh = Mesh(np.asarray(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    images_on_device = jax.device_put(_pad_batch(images, padded), batch_sharding)
    data_on_device = (
        None
        if target_data is None
        else {name: jax.device_put(_pad_batch(value, padded), batch_sharding) for name, value in target_data.items()}
    )
    variables_on_device = _replicated_variables(variables, devices, replicated)

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    config = _StepConfig(
        model,
        chosen_method,
        tuple(info.name for info in layer_infos),
        head_name,
        head_features,
        spec,
        kwargs,
        output_fn,
        eigen_smooth,
        chunk_size,
        aug_smooth,
        reshape,
        options,
        bias_layers(model, variables_key, images, kwargs) if "bias_gradients" in chosen_method.inputs else (),
    )
    if "key" in chosen_method.inputs:
        key = jax.random.key(0) if key is None else key
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key (jax.random.PRNGKey)
            key = jax.random.wrap_key_data(key)
    else:
        key = None
    out = _jitted_step(config, variables_on_device, images_on_device, data_on_device, key)
    if padded != batch:
        out = jax.tree_util.tree_map(lambda value: value[:batch], out)
    names = config.layers[0] if len(config.layers) == 1 else config.layers
    if chosen_method.bias_layers:
        names = "input+biases" if "bias_gradients" in chosen_method.inputs else "input"
    return Explanation(**out, method=chosen_method.name, layer=names)
