"""Array operations shared by every method: ReLU, per-map min-max normalization, resizing.

All functions are pure, work on any leading batch dimensions and run on device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: Epsilon of the per-map min-max normalization. pytorch-grad-cam's ``scale_cam_image`` uses the same
#: value: ``(x - min) / (1e-7 + max(x - min))``, so a constant map becomes zeros, never NaN.
NORMALIZE_EPS = 1e-7


def minmax_normalize(maps: jax.Array, eps: float = NORMALIZE_EPS, spatial: int = 2) -> jax.Array:
    """Scale each map (the last ``spatial`` axes: 2 for images, 3 for volumes) to [0, 1]:
    ``(m - min m) / (eps + max(m - min m))``.

    A constant map becomes all zeros (never NaN).
    """
    axes = tuple(range(-spatial, 0))
    shifted = maps - jnp.min(maps, axis=axes, keepdims=True)
    return shifted / (eps + jnp.max(shifted, axis=axes, keepdims=True))


def resize_maps(maps: jax.Array, size: tuple[int, ...], method: str = "bilinear") -> jax.Array:
    """Resize maps ``(..., h, w)`` to ``(..., H, W)`` with ``jax.image.resize`` (volumes, a 3-tuple
    ``size``: :func:`resize_volumes`).

    Bilinear upsampling uses half-pixel centres and clamps at the border, which is the convention of
    OpenCV's ``cv2.resize(..., INTER_LINEAR)`` (used by pytorch-grad-cam) and of PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)``. Non-square sizes such as 450x600 are fine.
    """
    if len(size) == 3:
        return resize_volumes(maps, size)
    height, width = size
    if maps.shape[-2:] == (height, width):
        return maps
    return jax.image.resize(maps, (*maps.shape[:-2], height, width), method=method)


@functools.lru_cache(maxsize=64)
def zoom_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``(out_size, in_size)`` matrix of ``scipy.ndimage.zoom`` along one axis (cubic B-spline, order 3,
    with its spline prefilter, ``mode="constant"``, corners aligned): column ``j`` is the zoom of the
    unit vector ``e_j``. The zoom is linear and separable, so a volume's zoom is this matrix applied
    along each axis."""
    from scipy import ndimage

    basis = np.eye(in_size)
    return np.stack([ndimage.zoom(basis[j], out_size / in_size) for j in range(in_size)], axis=1)


def resize_volumes(maps: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Resize volumes ``(..., d, h, w)`` to ``(..., D, H, W)`` as pytorch-grad-cam does for 3-D inputs
    (``scipy.ndimage.zoom``, cubic spline; see :func:`zoom_matrix`), by three matrix products on device."""
    if tuple(maps.shape[-3:]) == tuple(size):
        return maps
    depth, rows, cols = (jnp.asarray(zoom_matrix(o, i), maps.dtype) for o, i in zip(size, maps.shape[-3:]))
    highest = jax.lax.Precision.HIGHEST
    return jnp.einsum("Dd,...dhw,Hh,Ww->...DHW", depth, maps, rows, cols, precision=highest)
