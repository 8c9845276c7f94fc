"""Array operations shared by every method: ReLU, per-map min-max normalization, resizing.

All functions are pure, work on any leading batch dimensions and run on device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


def chunked_map(
    fn: Callable[[jax.Array], Any],
    count: int,
    chunk_size: int,
    fold: tuple[Any, Callable[[Any, jax.Array, jax.Array, Any], Any]] | None = None,
) -> Any:
    """``fn(indices)`` for ``indices = 0 .. count - 1``, at most ``chunk_size`` indices per call,
    sequentially on device with ``lax.map``: peak memory is that of one chunk (e.g. one forward pass of
    ``n <= chunk_size`` masked images). ``fn`` maps an ``(n,)`` int array to a pytree of arrays with a
    leading axis ``n``; the result has leading axis ``count``.

    The indices are split into ``ceil(count / chunk_size)`` equal chunks, the last padded by repeating
    index ``count - 1`` (so 10 rows with ``chunk_size=32`` cost 10 evaluations, not 32); padded rows
    are dropped. The one chunking helper of the score-based methods, SESS, the derivative diagonals and
    the perturbation metrics.

    With ``fold=(initial, combine)`` the chunks' results are not stacked but folded into an accumulator,
    ``carry = combine(carry, indices, valid, values)`` (``valid`` is False for the padding rows), with
    ``lax.scan``: memory of one chunk plus the accumulator. Returns the final accumulator.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = -(-count // chunk_size)
    size = -(-count // chunks)
    positions = jnp.arange(chunks * size).reshape(chunks, size)
    indices = jnp.minimum(positions, count - 1)
    if fold is not None:
        initial, combine = fold

        def step(carry: Any, chunk: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            index, position = chunk
            return combine(carry, index, position < count, fn(index)), None

        return jax.lax.scan(step, initial, (indices, positions))[0]
    out = jax.lax.map(fn, indices)
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(chunks * size, *leaf.shape[2:])[:count], out)


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
