"""The exception a user's mistake raises, and the checks of user input shared by the library and the CLI.

:class:`UserError` subclasses ``ValueError`` so that existing ``except ValueError`` code keeps working;
the command line prints any of them as one ``error: ...`` line with exit status 2 (no traceback).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class UserError(ValueError):
    """Bad input from the user (arguments, files, settings); the message says what is wrong and what
    is valid."""


class NonFiniteInputError(UserError):
    """Input images with NaN or infinite pixels (their maps would be NaN)."""


def non_finite_images(images: Any) -> np.ndarray:
    """Indices of the images of a ``(B, ...)`` batch (NumPy or JAX) with a NaN or infinite value.

    A JAX array is reduced on its device; only ``B`` booleans come to the host."""
    if isinstance(images, np.ndarray):
        finite = np.isfinite(images).reshape(images.shape[0], -1).all(axis=1)
    else:
        import jax.numpy as jnp

        finite = np.asarray(jnp.isfinite(images).reshape(images.shape[0], -1).all(axis=1))
    return np.flatnonzero(~finite)


def check_explain_arguments(images: Any, layer: Any = None, devices: Any = None) -> None:
    """The checks :func:`flaxcam.explain` makes of its arguments before any work: ``layer`` is a name
    or a sequence of names, ``devices`` (when given) is not empty, and the ``(B, H, W, C)`` images are
    channels-last (:func:`check_channels_last`) and finite (:func:`check_finite_images`)."""
    names = [layer] if layer is None or isinstance(layer, str) else layer
    if not isinstance(names, (list, tuple)) or not all(name is None or isinstance(name, str) for name in names):
        raise UserError(
            f"layer= must be a layer name such as 'layer4' or a sequence of names, got {type(layer).__name__} "
            f"{layer!r}; flaxcam.list_layers(model, variables, images) lists them"
        )
    if devices is not None and len(list(devices)) == 0:
        raise UserError("devices= is empty; pass None (all local devices) or a non-empty list such as jax.devices()")
    check_channels_last(images)
    check_finite_images(images)


def check_layer_outputs(layers: Any, image_shape: tuple[int, ...]) -> None:
    """Raise :class:`UserError` when a target layer's output has no pixels for images of
    ``image_shape`` ``(B, H, W, C)``: the input is smaller than the model's receptive field at that layer."""
    for info in layers:
        shape = tuple(info.shape)
        if len(shape) >= 3 and 0 in shape[1:-1]:
            raise UserError(
                f"images of {image_shape[1]}x{image_shape[2]} pixels are too small for layer {info.name!r}: its "
                f"output has shape {shape} (no pixels left after the strides and pooling); use larger images "
                "or an earlier layer"
            )


def check_channels_last(images: Any) -> None:
    """Raise :class:`UserError` for a batch that looks channels-first, ``(B, C, H, W)`` with ``C`` 1 or
    3 (PyTorch's layout), where flaxcam expects ``(B, H, W, C)``."""
    shape = tuple(images.shape)
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] > 4 and shape[2] > 4:
        raise UserError(
            f"images of shape {shape} look channels-first (B, C, H, W); flaxcam expects channels-last "
            f"(B, H, W, C): pass images.transpose(0, 2, 3, 1)"
        )


def check_finite_images(images: Any) -> None:
    """Raise :class:`NonFiniteInputError` naming the images (batch indices) that have a NaN or infinite
    pixel; such input gives NaN maps and meaningless predictions. Under a trace (inside ``jit``) the
    values are unknown and nothing is checked."""
    import jax

    if isinstance(images, jax.core.Tracer):
        return
    if isinstance(images, jax.Array) and not images.is_fully_addressable:  # a global array (several processes)
        for shard in images.addressable_shards:
            start = shard.index[0].start or 0
            local = non_finite_images(shard.data)
            if len(local):
                raise NonFiniteInputError(
                    f"images {', '.join(str(int(start + i)) for i in local[:10])} of the global batch have NaN or "
                    "infinite pixels; explain needs finite inputs (check the preprocessing and the source data)"
                )
        return
    bad = non_finite_images(images)
    if len(bad):
        shown = ", ".join(str(int(i)) for i in bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise NonFiniteInputError(
            f"images {shown} of the batch of {images.shape[0]} have NaN or infinite pixels; "
            "explain needs finite inputs (check the preprocessing and the source data)"
        )


def check_image_ids(image_ids: Any, batch: int) -> np.ndarray:
    """``image_ids`` as ``(batch,)`` uint32 (the ids that key each image's noise), or a clear error."""
    ids = np.asarray(image_ids)
    if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"image_ids must be {batch} ints (one per image), got shape {ids.shape} and dtype {ids.dtype}")
    return ids.astype(np.uint32)
