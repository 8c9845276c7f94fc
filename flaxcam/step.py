"""The pure traced step: probe → method → post-processing, for one batch.

:func:`explain_step` is a pure JAX function of ``(config, variables, images, target_data, key,
image_ids)`` with ``config`` static (a hashable :class:`StepConfig` built once by
:mod:`flaxcam.plan`): no host sync, no Python side effect, no data-dependent Python branching. Both
:func:`flaxcam.explainer`'s step and :func:`flaxcam.explain` run it — one traced code path.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import struct

from flaxcam import ops
from flaxcam.capture import BiasLayer, LayerError
from flaxcam.methods import LAYER_FUSIONS, REDUCTIONS, Method, get_method
from flaxcam.methods.guided import GuidedAdapter
from flaxcam.probe import (
    OutputFn,
    derivative_diagonals,
    input_and_layer_gradients,
    probe,
    probe_attention,
    probe_hessian,
)
from flaxcam.targets import ScoreName, TargetSpec, select_classes, target_scores

Array = jax.Array

#: Number of times the step has been traced (compiled); tests use it to prove that ragged batch sizes
#: reuse one program and that a jitted step compiles once per shape.
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
        equals ``maps``; its ``layer`` is ``"input+biases"``. An attention method (LeGrad) gives one
        map on the patch grid for all its blocks: ``low_res`` and ``raw`` are single arrays even when
        ``layer`` is a tuple of blocks.
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
class StepConfig:
    """Everything static about a step (hashable; built once by :mod:`flaxcam.plan`)."""

    model: Any  # a flaxcam.capture adapter (LinenModel or NNXModel)
    method: Method
    layers: tuple[str, ...]
    head: str | None
    head_features: str  # "identity" or "relu": what the head's global pooling reads of the layer output
    target_spec: TargetSpec
    output_fn: OutputFn
    eigen_smooth: bool = False
    chunk_size: int = 32
    aug_smooth: bool = False
    reshape: Callable[[Array], Array] | None = None
    method_options: tuple = ()  # sorted (name, value) pairs passed to the method function
    biased: tuple[BiasLayer, ...] = ()  # FullGrad's layers
    attention: tuple[str, ...] = ()  # attention methods: the attention probabilities layer of each block

    @property
    def layer_names(self) -> str | tuple[str, ...]:
        if self.method.bias_layers:
            return "input+biases" if "bias_gradients" in self.method.inputs else "input"
        return self.layers[0] if len(self.layers) == 1 else self.layers


def per_image_keys(key: Array, index: int, image_ids: Array | None, batch: int) -> Array:
    """The ``(B,)`` keys of layer ``index`` for the images: ``fold_in(fold_in(key, index), image_ids[b])``
    for one key (``image_ids`` default: positions ``0 .. B-1``), or ``fold_in(key[b], index)`` when
    ``key`` already holds one key per image. An image's noise depends on its id, not its position."""
    if key.ndim == 1:
        return jax.vmap(lambda k: jax.random.fold_in(k, index))(key)
    layer_key = jax.random.fold_in(key, index)
    ids = jnp.arange(batch) if image_ids is None else jnp.asarray(image_ids).astype(jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(layer_key, i))(ids)


def _contributions(
    config: StepConfig,
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

    _batch, num_targets = chosen.shape
    inputs: dict[str, Array | None] = {}  # gradients is None when the method does not need them
    axes: dict[str, int | None] = {}
    if "activations" in method.inputs:
        inputs["activations"], axes["activations"] = activations, None  # shared by the T targets
    if "gradients" in method.inputs:
        inputs["gradients"], axes["gradients"] = gradients, 0  # (B, T, h, w, C)
    if "class_weights" in method.inputs:
        kernel = config.model.head_kernel(variables, config.head)  # (C, K)
        if config.head_features == "relu":  # conv → ReLU (as a function) → pooling → Dense
            inputs["activations"] = jax.nn.relu(activations)
        inputs["class_weights"], axes["class_weights"] = kernel.T[chosen], 0  # (B, T, C)
    for name, value in (per_target or {}).items():
        if name in method.inputs:
            inputs[name], axes[name] = value, 0
    if "key" in method.inputs:
        per_target_keys = jax.vmap(lambda k: jax.vmap(lambda t: jax.random.fold_in(k, t))(jnp.arange(num_targets)))
        inputs["key"], axes["key"] = per_target_keys(key), 0  # (B, T) from the (B,) per-image keys

    options = dict(config.method_options)

    def per_image(image_inputs: dict[str, Array]) -> Array:
        over_targets = jax.vmap(lambda kw: method.fn(**kw, **options), in_axes=(axes,), axis_size=num_targets)
        return over_targets(image_inputs)

    return jax.vmap(per_image)(_batch_sharded_like(inputs, activations))


def _batch_sharded_like(values: Any, reference: Array) -> Any:
    """Under a mesh with explicit axes, give every array the batch sharding of ``reference`` (vmap over
    the batch needs one sharding of the mapped axis); a no-op otherwise (automatic sharding)."""
    spec = getattr(jax.typeof(reference).sharding, "spec", None)
    if not spec or spec[0] is None:
        return values
    batch_spec = jax.sharding.PartitionSpec(spec[0])
    return jax.tree_util.tree_map(
        lambda value: (
            value if jax.typeof(value).sharding.spec[:1] == (spec[0],) else jax.sharding.reshard(value, batch_spec)
        ),
        values,
    )


def _fixed_targets(config: StepConfig, chosen: Array, target_data: dict | None) -> tuple[TargetSpec, dict]:
    """The targets with the labels already chosen on the original images, to score new inputs with."""
    spec = config.target_spec
    if spec.kind in ("argmax", "top_k", "classes"):
        spec = TargetSpec("classes", spec.count, spec.score)
    return spec, {**(target_data or {}), "classes": chosen}


def _scored_by(spec: TargetSpec, score: ScoreName) -> TargetSpec:
    """``spec`` with its class targets scored by ``score`` (``"softmax"``, ...); other kinds unchanged."""
    return TargetSpec("classes", spec.count, score) if spec.kind == "classes" else spec


def _input_scorer(
    config: StepConfig, variables: Any, chosen: Array, target_data: dict | None, score: ScoreName | None = None
) -> Callable:
    """``score(new_images, image_index) -> (n, T)``: the targets of images ``image_index`` evaluated on
    new inputs (e.g. masked copies); class targets scored by ``score`` (``"softmax"``, ...) if given."""
    spec, data = _fixed_targets(config, chosen, target_data)
    if score is not None:
        spec = _scored_by(spec, score)

    def score_inputs(new_images: Array, image_index: Array) -> Array:
        output = config.output_fn(config.model.apply(variables, new_images))
        return target_scores(spec, output, {name: value[image_index] for name, value in data.items()})[0]

    return score_inputs


def _base_explainer(config: StepConfig, variables: Any, chosen: Array, target_data: dict | None) -> Callable:
    """``explain_at(new_images, image_index) -> (maps (n, T, H', W'), softmax scores (n, T))``: the maps
    of the meta-method's ``base`` method (option) for new inputs (e.g. patches) with the targets of
    images ``image_index``, and those targets' scores (class targets by their softmax probability, as
    ``softmax_score``) from the same forward pass."""
    spec, data = _fixed_targets(config, chosen, target_data)
    softmax_spec = _scored_by(spec, "softmax")
    base_name = {**config.method.options, **dict(config.method_options)}["base"]

    def explain_at(new_images: Array, image_index: Array) -> tuple[Array, Array]:
        base = dataclasses.replace(config, method=get_method(base_name), method_options=(), target_spec=spec)
        selected = {name: value[image_index] for name, value in data.items()}
        out = _run(base, variables, new_images, lambda output: target_scores(spec, output, selected), None, selected)
        return out["maps"], target_scores(softmax_spec, out["logits"], selected)[0]

    return explain_at


def _ablation_scorer(
    config: StepConfig, variables: Any, images: Array, layer: str, chosen: Array, target_data: dict | None
) -> Callable:
    """``ablate(delta, image_index) -> (n, T)``: the targets of images ``image_index`` with ``delta``
    added to ``layer``'s output (a forward pass of the whole network per row)."""
    spec, data = _fixed_targets(config, chosen, target_data)

    def ablate(delta: Array, image_index: Array) -> Array:
        output, _, _ = config.model.forward(variables, images[image_index], (layer,), (delta,))
        output = config.output_fn(output)
        return target_scores(spec, output, {name: value[image_index] for name, value in data.items()})[0]

    return ablate


def _input_prober(config: StepConfig, variables: Any, layer: str, chosen: Array, target_data: dict | None) -> Callable:
    """``probe_at(new_images) -> (activations (B, h, w, C), gradients (B, T, h, w, C))`` at ``layer``
    for a new batch standing for the images (e.g. noisy copies), with the targets chosen on the
    originals; ``reshape`` applied as for the images themselves."""
    spec, data = _fixed_targets(config, chosen, target_data)

    def probe_at(new_images: Array) -> tuple[Array, Array]:
        _, activations, gradients, _, _ = probe(
            config.model,
            variables,
            new_images,
            layer,
            lambda output: target_scores(spec, output, data),
            output_fn=config.output_fn,
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
    config: StepConfig,
    variables: Any,
    images: Array,
    score_fn: Callable[[Array], tuple[Array, Array]],
    key: Array | None,
    target_data: dict[str, Array] | None,
    image_ids: Array | None = None,
) -> dict[str, Any]:
    """Forward (+ backward) once, then the method at every layer; maps fused over layers as
    pytorch-grad-cam aggregates them: mean of the per-layer upsampled maps, normalized again."""
    method = config.method
    if method.score_transform is not None:
        score_fn = _transformed_scores(score_fn, method.score_transform)
    if method.bias_layers:
        return _run_bias_layers(config, variables, images, score_fn)
    if method.attention_layers:
        return _run_attention_layers(config, variables, images, score_fn)
    extras: dict[str, tuple[Array, ...]] = {}
    if "hvp" in method.inputs:
        logits, activations, gradients, extras["hvp"], scores, chosen = probe_hessian(
            config.model, variables, images, config.layers, score_fn, output_fn=config.output_fn
        )
    else:
        logits, activations, gradients, scores, chosen = probe(
            config.model,
            variables,
            images,
            config.layers,
            score_fn,
            with_gradients=method.needs_gradients,
            output_fn=config.output_fn,
        )
    if "second_derivatives" in method.inputs:
        extras["second_derivatives"], extras["third_derivatives"] = derivative_diagonals(
            config.model,
            variables,
            images,
            config.layers,
            score_fn,
            chunk_size=config.chunk_size,
            output_fn=config.output_fn,
        )
    raws, lows, upsampled = [], [], []
    for index in range(len(config.layers)):
        layer_key = None if key is None else per_image_keys(key, index, image_ids, images.shape[0])
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
            config,
            variables,
            images,
            layer_activations,
            layer_gradients,
            chosen,
            layer_key,
            target_data,
            config.layers[index],
            scores,
            per_target,
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
    config: StepConfig, variables: Any, images: Array, score_fn: Callable[[Array], tuple[Array, Array]]
) -> dict[str, Any]:
    """FullGrad: gradients w.r.t. the input and every biased layer from one backward pass, the method's
    map at the input resolution (per image and target), then normalization."""
    logits, scores, chosen, input_gradients, layer_gradients = input_and_layer_gradients(
        GuidedAdapter(config.model) if config.method.guided else config.model,
        variables,
        images,
        tuple(layer.name for layer in config.biased),
        score_fn,
        output_fn=config.output_fn,
    )
    biases = tuple(config.model.effective_bias(variables, layer) for layer in config.biased)
    for layer, bias, gradient in zip(config.biased, biases, layer_gradients):
        if bias.shape != gradient.shape[-1:]:
            raise LayerError(
                f"layer {layer.name!r}: bias of shape {bias.shape} does not match its output {gradient.shape[2:]}"
            )

    def per_target(image: Array, input_gradient: Array, gradients: tuple[Array, ...]) -> Array:
        available = {"images": image, "input_gradients": input_gradient, "bias_gradients": gradients, "biases": biases}
        return config.method.fn(**{name: available[name] for name in config.method.inputs})

    per_image = jax.vmap(per_target, in_axes=(None, 0, 0))  # over the T targets
    raw = jax.vmap(per_image)(images, input_gradients, layer_gradients)  # (B, T, H, W)
    maps = ops.minmax_normalize(jax.nn.relu(raw))
    return {"maps": maps, "low_res": maps, "raw": raw, "logits": logits, "targets": chosen, "scores": scores}


def _run_attention_layers(
    config: StepConfig, variables: Any, images: Array, score_fn: Callable[[Array], tuple[Array, Array]]
) -> dict[str, Any]:
    """LeGrad: each block's own class score (``model.project_tokens`` of its tokens, at the classes chosen
    on the model output), its gradient w.r.t. the block's attention probabilities, the method's key-token
    relevance per image and target, laid out on the patch grid (``config.reshape``); one map for all the
    blocks."""
    spec = TargetSpec("classes", config.target_spec.count, config.target_spec.score)

    def block_scores(tokens: Array, chosen: Array) -> Array:
        try:
            logits = config.model.call_method(variables, "project_tokens", tokens)
        except LayerError as error:
            raise LayerError(
                f"{config.method.name} scores each block's tokens (batch, tokens, dim) with the model's "
                f"project_tokens(tokens) -> logits method (flaxcam.models.TinyViT: final norm and head on the "
                f"mean token); {error}"
            ) from None
        return target_scores(spec, logits, {"classes": chosen})[0]

    found = probe_attention(
        config.model,
        variables,
        images,
        config.layers,
        config.attention,
        score_fn,
        block_scores,
        output_fn=config.output_fn,
    )
    method = config.method
    per_target = lambda gradients: method.fn(attention_gradients=gradients, **dict(config.method_options))
    relevance = jax.vmap(jax.vmap(per_target))(found.gradients)  # (B, T, N) over the key tokens
    batch, targets, keys = relevance.shape
    assert config.reshape is not None  # planned: reshape= or the default token grid
    grid = config.reshape(relevance.reshape(batch * targets, keys, 1))  # (B·T, h, w, 1)
    raw = grid[..., 0].reshape(batch, targets, *grid.shape[1:3])
    low_res = ops.minmax_normalize(jax.nn.relu(raw))
    maps = LAYER_FUSIONS["mean"]([ops.resize_maps(low_res, images.shape[1:3])])
    return {
        "maps": maps,
        "low_res": low_res,
        "raw": raw,
        "logits": found.logits,
        "targets": found.chosen,
        "scores": found.scores,
    }


def explain_step(
    config: StepConfig,
    variables: Any,
    images: Array,
    target_data: dict[str, Array] | None = None,
    key: Array | None = None,
    image_ids: Array | None = None,
) -> Explanation:
    """Maps for a batch: probe → method → post-processing (pure; ``config`` static)."""
    global TRACE_COUNT
    TRACE_COUNT += 1
    if not config.aug_smooth:
        score_fn = lambda out: target_scores(config.target_spec, out, target_data)
        out = _run(config, variables, images, score_fn, key, target_data, image_ids)
    else:
        out = _aug_smooth(config, variables, images, target_data, key, image_ids)
    out["probabilities"] = jax.nn.softmax(out["logits"], axis=-1)
    return Explanation(**out, method=config.method.name, layer=config.layer_names)


def _aug_smooth(
    config: StepConfig,
    variables: Any,
    images: Array,
    target_data: dict | None,
    key: Array | None,
    image_ids: Array | None,
) -> dict:
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
    tiled = (
        None if target_data is None else jax.tree_util.tree_map(lambda v: jnp.concatenate([v] * copies), target_data)
    )

    def score_fn(output):
        if not spec.chosen_from_output:
            return target_scores(spec, output, tiled)
        own = select_classes(spec, output.reshape(copies, batch, -1)[identity], None)
        return target_scores(
            TargetSpec("classes", spec.count, spec.score), output, {"classes": jnp.tile(own, (copies, 1))}
        )

    ids = None if image_ids is None else jnp.tile(jnp.asarray(image_ids), copies)
    out = _run(config, variables, augmented, score_fn, key, tiled, ids)

    def mean_over_copies(maps: Array) -> Array:
        per_copy = maps.reshape(copies, batch, *maps.shape[1:])
        restored = [
            per_copy[i][..., ::-1] if flip else per_copy[i] for i, (flip, _) in enumerate(AUG_SMOOTH_TRANSFORMS)
        ]
        return cast(Array, sum(restored)) / copies

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
