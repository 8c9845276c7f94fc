"""SESS: a meta-method that explains multi-scale sliding-window patches with a base method and fuses
their maps, as one batched, jitted computation in chunks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.methods.registry import METHODS, register
from flaxcam.methods.score import half_pixel_matrix
from flaxcam.ops import chunked_map

Array = jax.Array


def sess_bases() -> list[str]:
    """The methods SESS can run on its patches: the per-image, deterministic layer methods that need no
    classifier head and keep the targets' scores."""
    return [
        name
        for name, method in METHODS.items()
        if not (
            method.batched
            or method.bias_layers
            or method.needs_head
            or "key" in method.inputs
            or method.score_transform
            or method.attention_layers
        )
    ]


def window_starts(length: int, step: int, window: int) -> list[int]:
    """Starts of the windows along one axis: every ``step``, the last one shifted back inside."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def sess_scales(window: int, num_scales: int = 12, scale_step_ratio: float = 2.0 / 7.0) -> tuple[int, ...]:
    """The shorter sides SESS resizes the image to: ``window + i * round(window * scale_step_ratio)``."""
    step = round(window * scale_step_ratio)
    return tuple(window + step * i for i in range(num_scales))


def scaled_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The image size with its shorter side resized to ``shorter`` (torchvision's ``resize(img, s)``)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


@functools.lru_cache(maxsize=16)
def patch_geometry(
    height: int, width: int, window: int, step: int, scales: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every patch (scale by scale, windows row by row): the bilinear matrices that cut it from the
    image resized to its scale, ``(P, window, height)`` and ``(P, window, width)``, and those that paste
    its map back into that scale's canvas and resize the canvas to the image, ``(P, height, window)``
    and ``(P, width, window)``. Both resizes are bilinear with half-pixel centres (torchvision's resize
    up, ``cv2.resize`` INTER_LINEAR down)."""
    cut_rows, cut_cols, paste_rows, paste_cols = [], [], [], []
    for scale in scales:
        scaled_height, scaled_width = scaled_size(height, width, scale)
        up_rows, up_cols = half_pixel_matrix(scaled_height, height), half_pixel_matrix(scaled_width, width)
        down_rows, down_cols = half_pixel_matrix(height, scaled_height), half_pixel_matrix(width, scaled_width)
        for y in window_starts(scaled_height, step, window):
            for x in window_starts(scaled_width, step, window):
                cut_rows.append(up_rows[y : y + window])
                cut_cols.append(up_cols[x : x + window])
                paste_rows.append(down_rows[:, y : y + window])
                paste_cols.append(down_cols[:, x : x + window])
    return np.stack(cut_rows), np.stack(cut_cols), np.stack(paste_rows), np.stack(paste_cols)


def gaussian_blur(maps: Array, size: int = 11, sigma: float = 5.0) -> Array:
    """``cv2.GaussianBlur(map, (size, size), sigma)`` of ``(..., H, W)`` maps: a separable, normalized
    Gaussian kernel with mirrored borders (``BORDER_REFLECT_101``)."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = jnp.asarray(kernel / kernel.sum(), maps.dtype)
    half = size // 2
    for axis in (-2, -1):
        pad = [(0, 0)] * maps.ndim
        pad[axis] = (half, half)
        padded = jnp.pad(maps, pad, mode="reflect")
        length = maps.shape[axis]
        maps = cast(
            Array,
            sum(kernel[i] * jax.lax.slice_in_dim(padded, i, i + length, axis=axis % maps.ndim) for i in range(size)),
        )
    return maps


@register("sess", batched=True)
def sess(
    images: Array,
    explain_at: Callable[[Array, Array], tuple[Array, Array]],
    softmax_score: Callable[[Array, Array], Array],
    base: str = "gradcam",
    num_scales: int = 12,
    scale_step_ratio: float = 2.0 / 7.0,
    window_size: int | None = None,
    step_size: int | None = None,
    pre_filter_ratio: float = 0.0,
    theta: float = 0.0,
    pool: str = "mean",
    smooth_sigma: float = 5.0,
    chunk_size: int = 32,
) -> Array:
    r"""SESS (Saliency Enhancing with Scaling and Sliding) around the ``base`` method.

    The image is resized so that its shorter side is :math:`s_i = w + i \cdot \operatorname{round}(w
    \cdot r)`, :math:`i < ` ``num_scales`` (``w`` = ``window_size``, default the shorter side;
    ``r`` = ``scale_step_ratio``); square windows of side ``w`` slide over each scale every
    ``step_size`` (default ``w``; the last window of a row or column is shifted back inside). Each
    patch ``p`` gets the base method's map :math:`M_p` (normalized, at the patch resolution) for the
    image's targets and the weight :math:`\omega_p = s_p / \max_q s_q` with :math:`s_p \ge 0` the
    softmax probability of the target on the patch (the lowest ``pre_filter_ratio`` of the patches get
    none). Pasted back and resized to the image, :math:`\tilde M_p = D_p(\omega_p M_p)`, they are fused
    per pixel:

    .. math:: M(x) = \frac{\sum_p \tilde M_p(x)\, [\tilde M_p(x) > \theta]}{\sum_p [\tilde M_p(x) > \theta]}
              \ (\texttt{pool="mean"}), \qquad M(x) = \max_p \tilde M_p(x) \ (\texttt{"max"})

    then blurred by an 11 × 11 Gaussian of standard deviation ``smooth_sigma`` (0: no blur). Every patch
    of every image is one row of a chunked, jitted loop (``chunk_size`` patches per forward/backward
    pass; memory of one chunk plus the ``(B, T, H, W)`` accumulators). Returns contributions
    ``(B, T, H, W, 1)`` at the input resolution.

    With ``theta = 0`` and no pre-filter (the defaults) one pass per patch suffices: the weights are
    :math:`s_p / \max_q s_q`, a positive scale, so :math:`[\tilde M_p > 0] = [s_p > 0][D_p M_p > 0]` and
    the sums (or the max) are accumulated with :math:`s_p` and divided by :math:`\max_q s_q` at the end
    (when every :math:`s_p` is 0 the weights are 1, accumulated alongside). The scores then come from
    the base method's own forward pass. Otherwise the scores of all patches are computed first (one
    forward pass per patch) and the maps in a second pass.

    Reference: Tursun, Denman, Sridharan, Goan, Fookes. "SESS: Saliency Enhancing with Scaling and
    Sliding", ECCV 2022 (arXiv:2207.01769); pytorch-grad-cam's ``SESS``.
    """
    valid_bases = sess_bases()
    if base not in valid_bases:
        raise ValueError(f"sess: unknown or unsupported base method {base!r}; valid bases: {', '.join(valid_bases)}")
    if pool not in ("mean", "max"):
        raise ValueError(f"sess: pool must be 'mean' or 'max', got {pool!r}")
    if not 0.0 <= pre_filter_ratio < 1.0:
        raise ValueError(f"sess: pre_filter_ratio must be in [0, 1), got {pre_filter_ratio}")
    batch, height, width, _ = images.shape
    window = window_size or min(height, width)
    step = step_size or window
    scales = sess_scales(window, num_scales, scale_step_ratio)
    cut_rows, cut_cols, paste_rows, paste_cols = (
        jnp.asarray(m, images.dtype) for m in patch_geometry(height, width, window, step, scales)
    )
    patches = cut_rows.shape[0]
    highest = jax.lax.Precision.HIGHEST

    def cut(index: Array) -> tuple[Array, Array, Array]:
        image_index, patch = index // patches, index % patches
        crops = jnp.einsum(
            "nih,nhwc,njw->nijc", cut_rows[patch], images[image_index], cut_cols[patch], precision=highest
        )
        return crops, image_index, patch

    def paste(maps: Array, patch: Array) -> Array:
        """Patch maps ``(n, T, w, w)`` pasted into their scale's canvas, resized to ``(n, T, H, W)``."""
        return jnp.einsum("nHi,ntij,nWj->ntHW", paste_rows[patch], maps, paste_cols[patch], precision=highest)

    shape = (batch, height, width)
    if theta == 0.0 and pre_filter_ratio == 0.0:
        fused = _fused_single_pass(cut, explain_at, paste, shape, patches, pool, chunk_size).astype(images.dtype)
    else:
        fused = _fused_two_passes(
            cut,
            explain_at,
            softmax_score,
            paste,
            shape,
            images.dtype,
            patches,
            pool,
            theta,
            pre_filter_ratio,
            chunk_size,
        )
    if smooth_sigma > 0:
        fused = gaussian_blur(fused, 11, smooth_sigma)
    return fused[..., None]


def _fused_two_passes(
    cut: Callable[[Array], tuple[Array, Array, Array]],
    explain_at: Callable[[Array, Array], tuple[Array, Array]],
    softmax_score: Callable[[Array, Array], Array],
    paste: Callable[[Array, Array], Array],
    shape: tuple[int, int, int],
    dtype: jnp.dtype,
    patches: int,
    pool: str,
    theta: float,
    pre_filter_ratio: float,
    chunk_size: int,
) -> Array:
    """SESS's fused map ``(B, T, H, W)`` in general: the scores of every patch first (one forward pass
    each, for the pre-filter's ranks and the best score), then the weighted, pasted base maps above
    ``theta`` averaged per pixel (``pool="mean"``) or their maximum."""
    batch, height, width = shape
    scores = chunked_map(lambda index: softmax_score(*cut(index)[:2]), batch * patches, chunk_size)
    scores = jnp.maximum(scores.reshape(batch, patches, -1), 0)  # (B, P, T)
    kept = jnp.argsort(jnp.argsort(scores, axis=1), axis=1) >= int(patches * pre_filter_ratio)
    best = jnp.max(jnp.where(kept, scores, 0), axis=1, keepdims=True)
    weights = jnp.where(kept, jnp.where(best > 0, scores / jnp.where(best > 0, best, 1), 1.0), 0.0)

    def patch_maps(index: Array) -> Array:
        crops, image_index, patch = cut(index)
        maps = explain_at(crops, image_index)[0] * weights[image_index, patch][..., None, None]  # (n, T, w, w)
        return paste(maps, patch)

    zeros = jnp.zeros((batch, scores.shape[-1], height, width), dtype)

    def combine(carry: tuple[Array, Array], index: Array, valid: Array, pasted: Array) -> tuple[Array, Array]:
        total, counts = carry
        image_index = index // patches
        if pool == "max":
            return total.at[image_index].max(jnp.where(valid[:, None, None, None], pasted, 0)), counts
        hit = (pasted > theta) & valid[:, None, None, None]
        return total.at[image_index].add(jnp.where(hit, pasted, 0)), counts.at[image_index].add(
            hit.astype(counts.dtype)
        )

    total, counts = chunked_map(patch_maps, batch * patches, chunk_size, fold=((zeros, zeros), combine))
    return total if pool == "max" else jnp.where(counts > 0, total / jnp.where(counts > 0, counts, 1), 0.0)


def _fused_single_pass(
    cut: Callable[[Array], tuple[Array, Array, Array]],
    explain_at: Callable[[Array, Array], tuple[Array, Array]],
    paste: Callable[[Array, Array], Array],
    shape: tuple[int, int, int],
    patches: int,
    pool: str,
    chunk_size: int,
) -> Array:
    r"""SESS's fused map ``(B, T, H, W)`` for ``theta = 0`` without a pre-filter, one base-method pass per
    patch: each pasted map :math:`P_p = D_p M_p` is accumulated twice, weighted by its clipped score
    :math:`s_p` (divided by :math:`\max_q s_q` at the end) and unweighted (the weights when every
    score is 0), with the counts of the pixels it covers (``pool="mean"``) or as running maxima."""
    batch, height, width = shape

    def patch_maps(index: Array) -> tuple[Array, Array]:
        crops, image_index, patch = cut(index)
        maps, scores = explain_at(crops, image_index)  # (n, T, w, w), (n, T)
        return paste(maps, patch), jnp.maximum(scores, 0)

    def combine(carry: tuple[Array, ...], index: Array, valid: Array, values: tuple[Array, Array]) -> tuple[Array, ...]:
        pasted, scores = values
        image_index = index // patches
        scores = jnp.where(valid[:, None], scores, 0)
        weighted = pasted * scores[..., None, None]
        best = carry[0].at[image_index].max(scores)
        if pool == "max":
            valid_maps = valid[:, None, None, None]
            return (
                best,
                carry[1].at[image_index].max(jnp.where(valid_maps, weighted, 0)),
                carry[2].at[image_index].max(jnp.where(valid_maps, pasted, 0)),
            )
        covered = (pasted > 0) & valid[:, None, None, None]
        scored = covered & (scores > 0)[..., None, None]
        return (
            best,
            carry[1].at[image_index].add(jnp.where(scored, weighted, 0)),
            carry[2].at[image_index].add(scored.astype(pasted.dtype)),
            carry[3].at[image_index].add(jnp.where(covered, pasted, 0)),
            carry[4].at[image_index].add(covered.astype(pasted.dtype)),
        )

    shapes = jax.eval_shape(patch_maps, jnp.zeros((1,), jnp.int32))
    targets, dtype = shapes[1].shape[1], shapes[0].dtype
    zeros = jnp.zeros((batch, targets, height, width), dtype)
    initial = (jnp.zeros((batch, targets), dtype),) + (zeros,) * (2 if pool == "max" else 4)
    best, *sums = chunked_map(patch_maps, batch * patches, chunk_size, fold=(initial, combine))
    scored = (best > 0)[..., None, None]
    safe_best = jnp.where(scored, best[..., None, None], 1)
    if pool == "max":
        return jnp.where(scored, sums[0] / safe_best, sums[1])
    total = jnp.where(scored, sums[0] / safe_best, sums[2])
    counts = jnp.where(scored, sums[1], sums[3])
    return jnp.where(counts > 0, total / jnp.where(counts > 0, counts, 1), 0.0)
