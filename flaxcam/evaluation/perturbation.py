r"""Perturbation metrics: the target score after masking the input with the map, and the deletion /
insertion curves.

* :func:`confidence_change` — :math:`s(x \odot M) - s(x)`, pytorch-grad-cam's
  ``CamMultImageConfidenceChange`` (the map as a multiplicative mask of the preprocessed input).
* :func:`drop_in_confidence` / :func:`increase_in_confidence` — pytorch-grad-cam's ``DropInConfidence``
  :math:`\max(0, s(x) - s(x \odot M))` (an *absolute* drop) and ``IncreaseInConfidence``
  :math:`[s(x \odot M) > s(x)]`.
* :func:`average_drop` — torchcam's ``ClassificationMetric`` and the Grad-CAM++ paper's Average Drop,
  :math:`\max(0, s(x) - s(x \odot M)) / s(x)` (a *relative* drop; the paper reports its mean in %).
  The Increase in Confidence of both libraries is the same indicator; torchcam reports its mean.
* :func:`deletion_insertion` — the RISE deletion and insertion curves and their areas (torchcam's
  ``DeletionInsertionMetric``).

All are batched and jitted; the deletion / insertion curves of ``B`` images and ``S`` steps are one
compiled program that scores the perturbed inputs in chunks of ``chunk_size`` (memory bounded by the
chunk, :func:`flaxcam.ops.chunked_map`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.evaluation.common import (
    ApplyFn,
    Array,
    check_inputs,
    check_positive,
    check_score,
    target_scores,
)
from flaxcam.ops import chunked_map

BASELINES = ("zeros", "mean", "blur")


@functools.partial(jax.jit, static_argnames=("apply_fn", "score"))
def _masked_and_original(apply_fn: ApplyFn, variables: Any, images: Array, maps: Array, targets: Array, score: str):
    both = jnp.concatenate([images, images * maps[..., None]])
    scores = target_scores(apply_fn, variables, both, jnp.concatenate([targets, targets]), score)
    return scores[: images.shape[0]], scores[images.shape[0] :]


def masked_scores(
    apply_fn: ApplyFn, variables: Any, images, maps, targets, score: str = "logit"
) -> tuple[Array, Array]:
    """``(s(x), s(x ⊙ M))``, each ``(B,)``: the target score of each image and of the image multiplied by
    its map (broadcast over channels), from one forward pass of ``2B`` images."""
    check_score(score)
    images, maps, targets = check_inputs(images, maps, targets)
    return _masked_and_original(apply_fn, variables, images, maps, targets, score)


def confidence_change(apply_fn: ApplyFn, variables: Any, images, maps, targets, score: str = "logit") -> Array:
    r"""Change of the target score when the input is multiplied by the map, ``(B,)``.

    .. math:: \Delta(x) = s_c(x \odot M) - s_c(x)

    pytorch-grad-cam 1.5.7 ``CamMultImageConfidenceChange`` (negative: the map kept less evidence than
    the whole image). Higher is better.
    """
    original, masked = masked_scores(apply_fn, variables, images, maps, targets, score)
    return masked - original


def drop_in_confidence(apply_fn: ApplyFn, variables: Any, images, maps, targets, score: str = "logit") -> Array:
    r"""pytorch-grad-cam's ``DropInConfidence``, ``(B,)``: the absolute drop of the target score,

    .. math:: D(x) = \max\big(0,\ s_c(x) - s_c(x \odot M)\big)

    Unlike the Grad-CAM++ paper's Average Drop (:func:`average_drop`) it is not divided by
    :math:`s_c(x)`. Lower is better.
    """
    return jnp.maximum(-confidence_change(apply_fn, variables, images, maps, targets, score), 0.0)


def increase_in_confidence(apply_fn: ApplyFn, variables: Any, images, maps, targets, score: str = "logit") -> Array:
    r"""Increase in Confidence indicator, ``(B,)`` of 0/1 (float):

    .. math:: I(x) = [\,s_c(x \odot M) > s_c(x)\,]

    Chattopadhay et al., "Grad-CAM++" (WACV 2018, arXiv:1710.11063), Sec. 4.1; pytorch-grad-cam's
    ``IncreaseInConfidence`` and torchcam's ``conf_increase`` are the same indicator (torchcam reports
    the mean, the paper the mean in %). Higher is better.
    """
    original, masked = masked_scores(apply_fn, variables, images, maps, targets, score)
    return (masked > original).astype(original.dtype)


def average_drop(
    apply_fn: ApplyFn, variables: Any, images, maps, targets, score: str = "softmax", eps: float = 1e-7
) -> Array:
    r"""Relative drop of the target score under the map as a mask, ``(B,)``; its mean is Average Drop.

    .. math:: AD(x) = \frac{\max\big(0,\ s_c(x) - s_c(x \odot M)\big)}{s_c(x) + \epsilon}

    Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks"
    (WACV 2018, arXiv:1710.11063), Sec. 4.1; torchcam 0.5 ``ClassificationMetric`` (``avg_drop``, with
    ``eps = 1e-7``). The paper scores the softmax probability, hence the default ``score="softmax"``.

    Ill-defined case: the ratio means nothing when :math:`s_c(x) \le 0` (a logit can be negative;
    torchcam divides anyway and may return a negative or huge "drop"). Here such images get NaN, so a
    ``nanmean`` skips them. Lower is better.
    """
    original, masked = masked_scores(apply_fn, variables, images, maps, targets, score)
    drop = jnp.maximum(original - masked, 0.0) / (original + eps)
    return jnp.where(original > 0, drop, jnp.nan)


# --------------------------------------------------------------------------------------------- deletion


def gaussian_blur(images: Array, sigma: float = 5.0, size: int = 11) -> Array:
    """Gaussian blur of ``(B, H, W, C)`` images with a ``size × size`` kernel, zero padding (the blurred
    baseline of RISE's insertion metric: ``klen=11, nsig=5``, ``conv2d(padding=klen // 2)``). The
    kernel is separable: ``g(i) ∝ exp(-(i - size // 2)² / (2 σ²))``, normalized to sum 1 per axis."""
    offsets = np.arange(size) - size // 2
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = jnp.asarray(weights / weights.sum(), images.dtype)
    pad = size // 2
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = images.shape[1:3]
    rows = cast(Array, sum(kernel[i] * padded[:, i : i + height] for i in range(size)))
    return cast(Array, sum(kernel[i] * rows[:, :, i : i + width] for i in range(size)))


def baseline_images(images: Array, baseline: str | Any) -> Array:
    """The reference input of deletion / insertion: ``"zeros"`` (torchcam's default; in normalized input
    space, the dataset mean), ``"mean"`` (each image's per-channel mean), ``"blur"``
    (:func:`gaussian_blur`, RISE's insertion baseline) or an array broadcastable to the images."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            return jnp.zeros_like(images)
        if baseline == "mean":
            return jnp.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)
        if baseline == "blur":
            return gaussian_blur(images)
        raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)} or an array")
    try:
        return jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)
    except ValueError:
        raise ValueError(
            f"baseline of shape {np.shape(baseline)} does not broadcast to the images {images.shape}"
        ) from None


def perturbation_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels perturbed at each point of the curves: ``0, k, 2k, …, N`` with ``k = ceil(N / steps)``
    (torchcam's schedule; at most ``steps + 1`` points)."""
    step = -(-pixels // steps)
    return np.asarray([*range(0, pixels, step), pixels])


class Curves(NamedTuple):
    """Deletion and insertion curves ``(B, P)`` at the perturbed ``fractions`` ``(P,)``, and their areas
    (trapezoidal rule over the fractions) ``(B,)``."""

    fractions: Array
    deletion: Array
    insertion: Array
    deletion_auc: Array
    insertion_auc: Array


def pixel_ranks(maps: Array) -> Array:
    """``(B, H·W)`` rank of each pixel when sorted by decreasing map value; ties keep raster order (a
    stable sort, as torchcam's ``argsort(descending=True, stable=True)``)."""
    flat = maps.reshape(maps.shape[0], -1)
    order = jnp.argsort(-flat, axis=1, stable=True)
    return jnp.argsort(order, axis=1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "score", "steps", "chunk_size"))
def deletion_insertion_impl(
    apply_fn: ApplyFn,
    variables: Any,
    images: Array,
    maps: Array,
    targets: Array,
    baseline: Array,
    score: str,
    steps: int,
    chunk_size: int,
) -> Curves:
    """Jitted body of :func:`deletion_insertion` (no input checks; ``baseline`` is an array)."""
    batch, height, width, channels = images.shape
    pixels = height * width
    counts = perturbation_counts(pixels, steps)
    points = len(counts)
    ranks = pixel_ranks(maps)
    original = target_scores(apply_fn, variables, images, targets, score)
    # Rows per image: deletion at counts[1:] (the last, everything replaced, is also insertion's first
    # point) then insertion at counts[1:-1]; 1 + 2 (P - 2) forward passes per image, as torchcam.
    host_kinds = np.concatenate([np.zeros(points - 1, bool), np.ones(points - 2, bool)])  # True: insertion
    host_counts = np.concatenate([counts[1:], counts[1:-1]])
    per_image = len(host_kinds)
    kinds, row_counts = jnp.asarray(host_kinds), jnp.asarray(host_counts)
    flat_images = images.reshape(batch, pixels, channels)
    flat_baseline = baseline.reshape(batch, pixels, channels)

    def score_rows(index: Array) -> Array:
        image_index = index // per_image
        job = index % per_image
        relevant = ranks[image_index] < row_counts[job][:, None]  # (n, N)
        use_original = jnp.where(kinds[job][:, None], relevant, ~relevant)
        perturbed = jnp.where(use_original[..., None], flat_images[image_index], flat_baseline[image_index])
        perturbed = perturbed.reshape(-1, height, width, channels)
        return target_scores(apply_fn, variables, perturbed, targets[image_index], score)[:, None]

    rows = chunked_map(score_rows, batch * per_image, chunk_size).reshape(batch, per_image)
    deletion = jnp.concatenate([original[:, None], rows[:, : points - 1]], axis=1)
    insertion = jnp.concatenate([rows[:, points - 2 : points - 1], rows[:, points - 1 :], original[:, None]], axis=1)
    fractions = jnp.asarray(counts / pixels, original.dtype)
    return Curves(
        fractions,
        deletion,
        insertion,
        jnp.trapezoid(deletion, fractions, axis=1),
        jnp.trapezoid(insertion, fractions, axis=1),
    )


def deletion_insertion(
    apply_fn: ApplyFn,
    variables: Any,
    images,
    maps,
    targets,
    *,
    steps: int = 20,
    baseline: str | Any = "zeros",
    score: str = "logit",
    chunk_size: int = 32,
) -> Curves:
    r"""Deletion and insertion curves and their areas (Petsiuk et al., "RISE: Randomized Input Sampling
    for Explanation of Black-box Models", BMVC 2018, arXiv:1806.07421).

    Pixels are ranked by decreasing map value (ties in raster order). At ``P`` points with
    :math:`n_k = \min(k \lceil N / S \rceil, N)` pixels perturbed (:func:`perturbation_counts`):

    .. math:: \mathrm{del}_k = s_c\big(x \odot (1 - R_k) + b \odot R_k\big), \qquad
              \mathrm{ins}_k = s_c\big(x \odot R_k + b \odot (1 - R_k)\big)

    where :math:`R_k` selects the :math:`n_k` highest-ranked pixels (all channels) and ``b`` is the
    baseline (:func:`baseline_images`: ``"zeros"`` default, ``"mean"``, ``"blur"``). The areas are the
    trapezoidal integrals over the perturbed fraction :math:`n_k / N`. A low deletion area and a high
    insertion area mean a faithful map.

    Defaults are torchcam 0.5's ``DeletionInsertionMetric``: ``steps=20``, zero baseline, and the score
    chosen by ``score`` (torchcam's ``logits_fn``). Cost: ``1 + 2 (P - 2)`` forward passes per image plus
    one for the original scores, run ``chunk_size`` perturbed images at a time in one compiled program.

    Returns :class:`Curves` (curves ``(B, P)``, areas ``(B,)``).
    """
    check_score(score)
    check_positive("steps", steps)
    check_positive("chunk_size", chunk_size)
    images, maps, targets = check_inputs(images, maps, targets)
    reference = baseline_images(images, baseline)
    return deletion_insertion_impl(
        apply_fn, variables, images, maps, targets, reference, score, int(steps), int(chunk_size)
    )
