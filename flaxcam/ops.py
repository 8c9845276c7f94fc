"""Array operations shared by every method: ReLU, per-map min-max normalization, resizing.

All functions are pure, work on any leading batch dimensions and run on device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def chunked_map(fn: Callable[[jax.Array], Any], count: int, chunk_size: int) -> Any:
    """``fn(indices)`` for ``indices = 0 .. count - 1``, at most ``chunk_size`` indices per call,
    sequentially on device with ``lax.map``: peak memory is that of one chunk (e.g. one forward pass of
    ``n <= chunk_size`` masked images). ``fn`` maps an ``(n,)`` int array to a pytree of arrays with a
    leading axis ``n``; the result has leading axis ``count``.

    The indices are split into ``ceil(count / chunk_size)`` equal chunks, the last padded by repeating
    index ``count - 1`` (so 10 rows with ``chunk_size=32`` cost 10 evaluations, not 32); padded rows
    are dropped. The one chunking helper of the score-based methods and the derivative diagonals.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = -(-count // chunk_size)
    size = -(-count // chunks)
    indices = jnp.minimum(jnp.arange(chunks * size), count - 1).reshape(chunks, size)
    out = jax.lax.map(fn, indices)
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(chunks * size, *leaf.shape[2:])[:count], out)
