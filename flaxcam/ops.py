"""Array operations shared by every method: ReLU, per-map min-max normalization, resizing.

All functions are pure, work on any leading batch dimensions and run on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Epsilon of the per-map min-max normalization. pytorch-grad-cam's ``scale_cam_image`` uses the same
#: value: ``(x - min) / (1e-7 + max(x - min))``, so a constant map becomes zeros, never NaN.
NORMALIZE_EPS = 1e-7


def minmax_normalize(maps: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """Scale each map (the last two axes) to [0, 1]: ``(m - min m) / (eps + max(m - min m))``.

    A constant map becomes all zeros (never NaN).
    """
    shifted = maps - jnp.min(maps, axis=(-2, -1), keepdims=True)
    return shifted / (eps + jnp.max(shifted, axis=(-2, -1), keepdims=True))


def resize_maps(maps: jax.Array, size: tuple[int, int], method: str = "bilinear") -> jax.Array:
    """Resize maps ``(..., h, w)`` to ``(..., H, W)`` with ``jax.image.resize``.

    Bilinear upsampling uses half-pixel centres and clamps at the border, which is the convention of
    OpenCV's ``cv2.resize(..., INTER_LINEAR)`` (used by pytorch-grad-cam) and of PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)``. Non-square sizes such as 450x600 are fine.
    """
    height, width = size
    if maps.shape[-2:] == (height, width):
        return maps
    return jax.image.resize(maps, (*maps.shape[:-2], height, width), method=method)
