"""On-device colormaps and heat-map overlays.

The look-up table is matplotlib's ``"jet"`` (the colormap of the CAM and Grad-CAM papers and of
pytorch-grad-cam's ``show_cam_on_image``), sampled at 256 levels once on the host; the lookup and the
blend run on device, are jittable and work on any leading batch dimensions.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["apply_colormap", "jet_lut", "overlay"]

#: Number of levels of the look-up table.
LUT_SIZE = 256


@lru_cache(maxsize=1)
def _jet_lut() -> np.ndarray:
    import matplotlib

    lut = np.asarray(matplotlib.colormaps["jet"](np.linspace(0.0, 1.0, LUT_SIZE))[:, :3], np.float32)
    lut.setflags(write=False)
    return lut


def jet_lut() -> np.ndarray:
    """matplotlib's ``"jet"`` as a read-only ``(256, 3)`` float32 RGB table in [0, 1] (computed once, cached).

    Row ``i`` is the colour of the value ``i / 255``; it equals ``matplotlib.colormaps["jet"](i / 255)``.
    """
    return _jet_lut()


def apply_colormap(maps: jax.Array, lut: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Colour maps ``(..., H, W)`` with values in [0, 1] → RGB ``(..., H, W, 3)`` in [0, 1], on device.

    The table row is ``clip(round(m * 255), 0, 255)`` (for a table of ``K`` rows: ``round(m * (K - 1))``),
    so values outside [0, 1] saturate and NaN maps to row 0. ``lut`` defaults to :func:`jet_lut`; any
    ``(K, C)`` table works.
    """
    table = jnp.asarray(jet_lut() if lut is None else lut)
    if table.ndim != 2:
        raise ValueError(f"lut must have shape (levels, channels), got {table.shape}")
    levels = table.shape[0]
    maps = jnp.asarray(maps)
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    maps = jnp.nan_to_num(maps, nan=0.0)
    index = jnp.clip(jnp.round(maps * (levels - 1)), 0, levels - 1).astype(jnp.int32)
    return jnp.take(table, index, axis=0)


def overlay(images: jax.Array, maps: jax.Array, alpha: float = 0.5) -> jax.Array:
    """Blend jet-coloured maps over images: ``clip((1 - alpha) * images + alpha * apply_colormap(maps), 0, 1)``.

    Args:
        images: ``(..., H, W, 3)`` floats in [0, 1] (integer images are taken as 0..255 and divided by 255).
        maps: ``(..., H, W)`` values in [0, 1] (e.g. min-max normalized CAMs) at the images' resolution;
            leading dimensions broadcast against the images'.
        alpha: weight of the heat map (0: the image only, 1: the heat map only). May be traced.

    Returns:
        ``(..., H, W, 3)`` float RGB in [0, 1]. Jittable; batched over leading dimensions.
    """
    images = jnp.asarray(images)
    maps = jnp.asarray(maps)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (..., H, W, 3), got {images.shape}")
    if maps.ndim < 2 or maps.shape[-2:] != images.shape[-3:-1]:
        raise ValueError(
            f"maps (..., H, W) must match the images' height and width: maps have shape {maps.shape}, "
            f"images have shape {images.shape} (resize the maps first, e.g. flaxcam.ops.resize_maps)"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32) / 255.0
    colours = apply_colormap(maps).astype(images.dtype)
    return jnp.clip((1 - alpha) * images + alpha * colours, 0.0, 1.0)
