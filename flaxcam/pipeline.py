"""``explain``: the convenience wrapper — bucketing, padding, device placement — around the pure step.

:func:`explain` plans with :func:`flaxcam.explainer` (cached on shapes), validates the targets on the
host, pads the batch to a bucket size so ragged batches reuse one program, places the data on the
devices (a user ``mesh`` or ``devices``) and runs the jitted :func:`flaxcam.step.explain_step` — the
same traced code as the step that :func:`flaxcam.explainer` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcam.capture import is_nnx
from flaxcam.errors import check_explain_arguments, check_image_ids
from flaxcam.plan import explainer, invalidate_nnx_split, split_nnx
from flaxcam.probe import OutputFn
from flaxcam.step import Explanation, explain_step
from flaxcam.targets import resolve_targets

Array = jax.Array

__all__ = ["Explanation", "bucket_size", "explain"]

_jitted_step = jax.jit(explain_step, static_argnums=0)


def _placed_variables(variables: Any, mesh: Mesh) -> Any:
    """``variables`` on the mesh's devices: a leaf already spread over exactly those devices keeps its
    sharding (parameters sharded by the caller stay sharded, nothing is gathered), and so does the
    common one-device case; any other leaf is replicated with ``device_put``."""
    devices = set(mesh.devices.flat)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf: Any) -> Any:
        if (
            isinstance(leaf, jax.Array)
            and not isinstance(leaf, jax.core.Tracer)
            and leaf.sharding.device_set == devices
        ):
            return leaf
        return jax.device_put(leaf, replicated)

    leaves = jax.tree_util.tree_leaves(variables)
    if all(isinstance(leaf, jax.Array) and leaf.sharding.device_set == devices for leaf in leaves):
        return variables
    return jax.tree_util.tree_map(place, variables)


def bucket_size(batch: int, multiple_of: int = 1) -> int:
    """Padded batch size: the next power of two up to 256, then the next multiple of 256; always a
    multiple of ``multiple_of`` (the number of devices the batch is sharded over)."""
    size = 1 << max(0, (batch - 1).bit_length()) if batch <= 256 else -(-batch // 256) * 256
    return -(-size // multiple_of) * multiple_of


def _as_images(images: Any) -> Array | np.ndarray:
    if not hasattr(images, "ndim"):
        images = np.asarray(images)
    if images.ndim not in (4, 5):
        raise ValueError(
            f"images must be a (batch, height, width, channels) array (or (batch, depth, height, width, "
            f"channels) volumes), got shape {tuple(images.shape)}; add a batch axis for a single image"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point (preprocessed as the model expects), got dtype {images.dtype}")
    return images


def _pad_batch(array: Any, size: int) -> Any:
    if array.shape[0] == size:
        return array
    pad = [(0, size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, pad) if isinstance(array, np.ndarray) else jnp.pad(array, pad)


def explain(
    model: Any,
    variables: Any,
    images: Any = None,
    *,
    method: str = "gradcam",
    layer: str | Sequence[str] | None = None,
    targets: Any = None,
    top_k: int | None = None,
    head: str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    output_fn: OutputFn | None = None,
    devices: Sequence[jax.Device] | None = None,
    mesh: Mesh | None = None,
    batch_axis: str | None = None,
    eigen_smooth: bool = False,
    key: Array | None = None,
    image_ids: Any = None,
    chunk_size: int = 32,
    aug_smooth: bool = False,
    score: str = "logit",
    reshape: Callable[[Array], Array] | None = None,
    method_options: Mapping[str, Any] | None = None,
) -> Explanation:
    """Explain a batch of images with one jitted call.

    ``explain(linen_model, variables, images, ...)`` or ``explain(nnx_model, images, ...)``.

    Args:
      model: a Flax linen module (``model.apply(variables, images, **apply_kwargs)``) or an NNX module
        in eval mode (``model(images)``, never modified); it must return logits ``(B, K)`` (or pass
        ``output_fn`` to pick them from a richer output).
      variables: the linen model's variables (``params``, ``batch_stats``, ...); none for NNX.
      images: ``(B, H, W, C)`` float array, preprocessed as the model expects. Any ``H, W``.
      method: ``"gradcam"`` (default) or ``"cam"``; see :data:`flaxcam.METHODS`.
      layer: dotted name of the target layer (``"layer4"``, ``"layer3.1"``), or several names to fuse
        (one forward/backward pass for all); default: the last submodule with a ``(B, h, w, C)``
        output. An unknown name raises an error listing the valid ones.
      targets: ``None`` (each image's top class), one class for all, one class per image, a
        ``(B, T)`` array of classes, or a :class:`flaxcam.targets.Binary`, ``Segmentation`` or
        ``Embedding`` target for other kinds of output, or a callable ``scores(output) -> (B,)`` or
        ``(B, T)`` (any score of the model output, traced in the step).
      score: for class targets, explain the ``"logit"`` (default), the ``"softmax"`` probability or
        the ``"rest"`` score (logit minus cross-entropy, :func:`flaxcam.targets.rest_scores`).
      reshape: turns a non-spatial layer output into ``(B, h, w, C)`` — e.g. a ViT's ``(B, 1 + hw, D)``
        tokens without the class token — applied to activations and gradients alike (pytorch-grad-cam's
        ``reshape_transform``); pass a module-level function so it is hashed once.
      top_k: explain each image's ``k`` highest-scoring classes (``T = k``), from one forward pass.
      head: for CAM, the Dense layer after global pooling (default: the last ``nn.Dense`` called).
      apply_kwargs: extra keyword arguments of ``model.apply`` (e.g. ``{"train": False}``).
      devices: devices to shard the batch over (default: all local devices).
      mesh, batch_axis: a user ``jax.sharding.Mesh`` instead: the batch is sharded over its
        ``batch_axis`` (default its first axis); variables already sharded over the mesh (e.g. kernels
        over a ``model`` axis) stay as they are, other leaves are replicated. Inside
        ``with jax.set_mesh(mesh)`` that mesh is the default.
      eigen_smooth: reduce each method's per-channel contributions by their first principal
        component instead of their sum (pytorch-grad-cam's ``eigen_smooth``; deterministic sign).
      key: PRNG key of the stochastic methods (default ``jax.random.key(0)``): same key, same maps.
        Layer ``i`` of a call draws from ``jax.random.fold_in(key, i)``, image ``b`` from that folded
        with ``image_ids[b]``.
      image_ids: ``B`` ints identifying the images (e.g. their index in the data set): the stochastic
        methods key image ``b``'s noise by ``image_ids[b]`` (default: its position ``b`` in this call),
        so one image gets one map whatever its batch, position, device count or a resume.
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
    arguments = dict(locals())  # to explain again when an NNX model changed under the fast path (below)
    still_current = None
    if is_nnx(model):
        if images is not None:
            raise TypeError(
                "an NNX model carries its own state: call explain(model, images, ...) without a variables "
                "argument (or flaxcam.explainer(model, ...)(state, images) to pass another state)"
            )
        images = _as_images(variables)
        check_explain_arguments(images, layer, devices)
        # the state from the model's last split; whether the model still has that structure and those
        # arrays is checked once the computation is dispatched (split_nnx)
        planned_model, variables, still_current = split_nnx(
            model, tuple(sorted((apply_kwargs or {}).items())), deferred=True
        )
    elif images is None:
        raise TypeError("explain(model, variables, images, ...) for a linen model (explain(model, images) is for NNX)")
    else:
        images = _as_images(images)
        check_explain_arguments(images, layer, devices)
        planned_model = model
    try:
        fn = explainer(
            planned_model,
            method=method,
            layer=layer,
            targets=targets if callable(targets) else None,
            top_k=top_k,
            score=score,
            head=head,
            apply_kwargs=apply_kwargs,
            output_fn=output_fn,
            reshape=reshape,
            method_options=method_options,
            eigen_smooth=eigen_smooth,
            chunk_size=chunk_size,
            aug_smooth=aug_smooth and _aug_smooth_allowed(targets),
        )
        batch = images.shape[0]
        planned = fn.plan(variables, images)
        spec, target_data = resolve_targets(targets, top_k, batch, planned.output_shape, score)
        config = fn.step_config(planned, spec)

        mesh, batch_axis = _mesh(mesh, batch_axis, devices)
        padded = bucket_size(batch, mesh.shape[batch_axis])
        batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axis))
        images_on_device = jax.device_put(_pad_batch(images, padded), batch_sharding)
        data_on_device = (
            None
            if target_data is None
            else {
                name: jax.device_put(_pad_batch(value, padded), batch_sharding) for name, value in target_data.items()
            }
        )
        ids = None
        if image_ids is not None:
            ids = jax.device_put(_pad_batch(check_image_ids(image_ids, batch), padded), batch_sharding)
        step_key = None
        if "key" in config.method.inputs:
            step_key = jax.random.key(0) if key is None else key
            if not jnp.issubdtype(step_key.dtype, jax.dtypes.prng_key):  # a raw uint32 key (jax.random.PRNGKey)
                step_key = jax.random.wrap_key_data(step_key)
        out = _jitted_step(config, _placed_variables(variables, mesh), images_on_device, data_on_device, step_key, ids)
    except Exception:
        # planned with an NNX model's last split, which the model may no longer match (a new layer name,
        # another structure): the error is only meaningful for the model as it is now
        if _changed(model, still_current):
            return explain(**arguments)
        raise
    if _changed(model, still_current):
        return explain(**arguments)
    if padded != batch:
        out = jax.tree_util.tree_map(lambda value: value[:batch], out)
    return out


def _changed(model: Any, still_current: Callable[[], bool] | None) -> bool:
    """Whether an NNX model explained from its kept split has changed since (then the split is marked
    stale and the caller explains again); ``False`` for the other paths (no check to make)."""
    if still_current is None or still_current():
        return False
    invalidate_nnx_split(model)
    return True


def _aug_smooth_allowed(targets: Any) -> bool:
    from flaxcam.targets import Segmentation

    if isinstance(targets, Segmentation):
        raise ValueError("aug_smooth does not support Segmentation targets yet (the masks would need flipping)")
    return True


def _mesh(mesh: Mesh | None, batch_axis: str | None, devices: Sequence[jax.Device] | None) -> tuple[Mesh, str]:
    """The mesh the batch is sharded over and its batch axis: the caller's ``mesh`` (batch axis
    ``batch_axis``, default its first axis), else the context mesh (``jax.set_mesh``), else a 1-D mesh
    over ``devices`` (default: all local)."""
    if mesh is not None:
        if devices is not None:
            raise ValueError("pass either mesh= or devices=, not both")
        axis = batch_axis if batch_axis is not None else mesh.axis_names[0]
        if axis not in mesh.axis_names:
            raise ValueError(f"batch_axis {axis!r} is not an axis of the mesh; its axes: {list(mesh.axis_names)}")
        return mesh, axis
    if devices is None and not jax.sharding.get_abstract_mesh().empty:  # inside `with jax.set_mesh(mesh)`
        return _mesh(jax.sharding.get_mesh(), batch_axis, None)
    if batch_axis is not None:
        raise ValueError("batch_axis= names an axis of mesh=; pass mesh= too")
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError("devices= must name at least one device")
    return Mesh(np.asarray(devices), ("batch",)), "batch"
