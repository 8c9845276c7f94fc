"""Score-based methods: channel weights from forward passes of masked inputs (no gradients).

They receive the whole batch and a batched ``forward(images) -> logits`` function; the masked forward
passes run on device in chunks of ``chunk_size`` images, so peak memory is bounded by the chunk, not by
``B x C`` masked copies of the input (pytorch-grad-cam materializes a ``B x C x 3 x H x W`` tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.methods.noise import standard_normal_at
from flaxcam.methods.registry import register
from flaxcam.ops import chunked_map

Array = jax.Array


def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``(out_size, in_size)`` bilinear interpolation matrix with ``align_corners=True``.

    Output pixel ``i`` samples input position ``i * (in - 1) / (out - 1)``: the convention of PyTorch's
    ``UpsamplingBilinear2d``, which pytorch-grad-cam's ScoreCAM uses to upsample the activations.
    """
    if out_size == 1 or in_size == 1:
        matrix = np.zeros((out_size, in_size), np.float32)
        matrix[:, 0] = 1.0
        return matrix
    position = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    low = np.clip(np.floor(position).astype(int), 0, in_size - 2)
    frac = position - low
    matrix = np.zeros((out_size, in_size), np.float64)
    matrix[np.arange(out_size), low] = 1 - frac
    matrix[np.arange(out_size), low + 1] += frac
    return matrix.astype(np.float32)


def half_pixel_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``(out_size, in_size)`` bilinear interpolation matrix with half-pixel centres (``align_corners=False``).

    Output pixel ``i`` samples input position ``(i + 0.5) * in / out - 0.5``, clamped to ``[0, in - 1]``:
    the convention of PyTorch's ``F.interpolate(..., mode="bilinear", align_corners=False)``, which
    torchcam's Score-CAM family uses to upsample its masks.
    """
    position = np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    frac = position - low
    matrix = np.zeros((out_size, in_size), np.float64)
    matrix[np.arange(out_size), low] += 1 - frac
    matrix[np.arange(out_size), high] += frac
    return matrix.astype(np.float32)


def channel_softmax(scores: Array, axis: int) -> Array:
    """Softmax of the masked-input scores over channels, safe for any scores.

    Two guards the reference libraries (pytorch-grad-cam, torchcam: a plain ``softmax``) do not have:

    * a non-finite score (a masked or noisy input whose forward pass overflowed, e.g. SS-CAM with a
      huge ``std``) becomes the lowest / highest finite value (NaN and -inf: lowest; +inf: highest), so
      it gets weight 0 (or the whole weight) instead of turning every weight into NaN;
    * the scores are materialized (``lax.optimization_barrier``) before the softmax: otherwise XLA may
      fuse the maximum and the differences ``x - max`` from separately rounded evaluations of the
      scores, and for scores of magnitude above about 1e9 the rounding difference alone overflows
      ``exp`` (inf / inf = NaN under ``jit``, not eagerly).

    For finite scores the result is ``jax.nn.softmax(scores, axis)`` exactly.
    """
    finfo = jnp.finfo(scores.dtype)
    scores = jnp.nan_to_num(scores, nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    return jax.nn.softmax(jax.lax.optimization_barrier(scores), axis=axis)


def _channel_mask_scores(
    activations: Array, images: Array, score: Callable[[Array, Array], Array], channels: Array, chunk_size: int
) -> Array:
    """Score-CAM's masked scores ``(B, N, T)`` for the channels ``channels`` ``(B, N)`` of each image:
    the channel upsampled (``align_corners=True``), min-max normalized at the input resolution, times
    the image, scored for the image's targets."""
    batch, _, _, _ = activations.shape
    count = channels.shape[1]
    height, width = images.shape[1:3]
    rows = jnp.asarray(align_corners_matrix(height, activations.shape[1]))
    cols = jnp.asarray(align_corners_matrix(width, activations.shape[2]))

    def chunk_scores(index: Array) -> Array:
        image_index = index // count
        maps = activations[image_index, :, :, channels[image_index, index % count]]  # (n, h, w)
        upsampled = jnp.einsum("Hh,nhw,Ww->nHW", rows, maps, cols)
        low = jnp.min(upsampled, axis=(1, 2), keepdims=True)
        high = jnp.max(upsampled, axis=(1, 2), keepdims=True)
        masks = (upsampled - low) / (high - low + 1e-8)
        return score(images[image_index] * masks[..., None], image_index)  # (n, T)

    return chunked_map(chunk_scores, batch * count, chunk_size).reshape(batch, count, -1)


@register("scorecam", batched=True, passes=lambda c, o: c)
def scorecam(
    activations: Array,
    images: Array,
    score: Callable[[Array, Array], Array],
    chunk_size: int = 32,
) -> Array:
    r"""Score-CAM for a batch: each channel, upsampled and min-max normalized, masks the input; the
    channel's weight is the softmax over channels of the target's logit on that masked input.

    .. math:: H_k = \frac{U(A_k) - \min U(A_k)}{\max U(A_k) - \min U(A_k) + 10^{-8}}, \quad
              \alpha^c = \operatorname{softmax}_k\big(y^c(X \odot H_k)\big), \quad M = \sum_k \alpha^c_k A_k

    ``U`` is bilinear upsampling to the input size with ``align_corners=True`` (pytorch-grad-cam's
    convention). Cost: ``C`` forward passes per image (all targets of an image share them), run in
    chunks of ``chunk_size`` masked images.

    Args: activations ``(B, h, w, C)``, images ``(B, H, W, 3)``, ``score(masked_images, image_index)``
    giving the ``(n, T)`` target scores of ``n`` masked copies of the images ``image_index``.
    Returns: contributions ``(B, T, h, w, C)``.

    Reference: Wang et al. "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR Workshops 2020 (arXiv:1910.01279).
    """
    batch, _, _, channels = activations.shape
    every_channel = jnp.broadcast_to(jnp.arange(channels), (batch, channels))
    scores = _channel_mask_scores(activations, images, score, every_channel, chunk_size)  # (B, C, T)
    weights = channel_softmax(scores, axis=1).transpose(0, 2, 1)  # (B, T, C)
    return activations[:, None] * weights[:, :, None, None, :]


@register("faster_scorecam", batched=True, passes=lambda c, o: min(c, o["top_channels"]))
def faster_scorecam(
    activations: Array,
    images: Array,
    score: Callable[[Array, Array], Array],
    top_channels: int = 10,
    chunk_size: int = 32,
) -> Array:
    r"""Faster Score-CAM: Score-CAM over only the ``N = top_channels`` channels of largest spatial
    variance; the other channels get weight 0.

    .. math:: S = \operatorname{top}_N\big(\operatorname{Var}_{x,y} A_k(x,y)\big), \quad
              \alpha^c_k = \operatorname{softmax}_{k \in S}\big(y^c(X \odot H_k)\big) \ (k \in S), \ 0 \text{ otherwise},
              \quad M = \sum_k \alpha^c_k A_k

    with ``H_k`` Score-CAM's mask (:func:`scorecam`); with ``N >= C`` it is Score-CAM exactly. Ties in
    variance go to the lower channel index. Cost: ``min(N, C)`` forward passes per image.

    Returns: contributions ``(B, T, h, w, C)``.

    Reference: the "Faster Score-CAM" variant from the Score-CAM authors' repository
    (github.com/haofanwang/Score-CAM, contributed by tabayashi0117; ``max_N`` in tf-keras-vis), on
    Wang et al., CVPR Workshops 2020 (arXiv:1910.01279).
    """
    if top_channels < 1:
        raise ValueError(f"top_channels must be >= 1, got {top_channels}")
    batch, _, _, channels = activations.shape
    count = min(top_channels, channels)
    _, selected = jax.lax.top_k(jnp.var(activations, axis=(1, 2)), count)  # (B, N)
    scores = _channel_mask_scores(activations, images, score, selected, chunk_size)  # (B, N, T)
    selected_weights = channel_softmax(scores, axis=1).transpose(0, 2, 1)  # (B, T, N)
    weights = jnp.zeros((batch, scores.shape[2], channels), selected_weights.dtype)
    weights = jax.vmap(lambda w, s, i: w.at[:, i].set(s))(weights, selected_weights, selected)
    return activations[:, None] * weights[:, :, None, None, :]


def torchcam_masks(maps: Array, height: int, width: int) -> Array:
    """torchcam's Score-CAM masks of ``(n, h, w)`` channel maps: min-max normalized *at the layer's
    resolution*, :math:`(A - \\min A) / (\\max(A - \\min A) + 10^{-8})`, then upsampled bilinearly
    with half-pixel centres (``align_corners=False``) to ``(n, height, width)``."""
    shifted = maps - jnp.min(maps, axis=(1, 2), keepdims=True)
    normalized = shifted / (jnp.max(shifted, axis=(1, 2), keepdims=True) + 1e-8)
    rows = jnp.asarray(half_pixel_matrix(height, maps.shape[1]))
    cols = jnp.asarray(half_pixel_matrix(width, maps.shape[2]))
    return jnp.einsum("Hh,nhw,Ww->nHW", rows, normalized, cols)


def _sampled_mask_weights(
    activations: Array,
    images: Array,
    score: Callable[[Array, Array], Array],
    num_samples: int,
    chunk_size: int,
    masked_input: Callable[[Array, Array, Array, Array, Array], Array],
) -> Array:
    """Softmax over channels of the target scores averaged over ``num_samples`` masked inputs per
    channel: row ``(b, m, k)`` scores ``masked_input(image, mask, b, m, k)`` with torchcam's mask of
    channel ``k`` of image ``b``. Returns weights ``(B, T, C)``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    batch, _, _, channels = activations.shape
    height, width = images.shape[1:3]

    def chunk_scores(index: Array) -> Array:
        image_index = index // (num_samples * channels)
        sample = (index // channels) % num_samples
        channel = index % channels
        masks = torchcam_masks(activations[image_index, :, :, channel], height, width)  # (n, H, W)
        inputs = jax.vmap(masked_input)(images[image_index], masks, image_index, sample, channel)
        return score(inputs, image_index)

    scores = chunked_map(chunk_scores, batch * num_samples * channels, chunk_size)
    mean = scores.reshape(batch, num_samples, channels, -1).mean(axis=1)  # (B, C, T)
    return channel_softmax(mean, axis=1).transpose(0, 2, 1)


@register("sscam", batched=True, passes=lambda c, o: c * o["num_samples"])
def sscam(
    activations: Array,
    images: Array,
    score: Callable[[Array, Array], Array],
    key: Array,
    num_samples: int = 35,
    std: float = 2.0,
    chunk_size: int = 32,
) -> Array:
    r"""SS-CAM (Smoothed Score-CAM) as torchcam 0.5 defines it: Score-CAM whose masks get Gaussian
    noise, the scores averaged over ``num_samples`` noisy masks per channel.

    .. math:: \hat M_{k,m} = U\Big(\frac{A_k - \min A_k}{\max(A_k - \min A_k) + 10^{-8}}\Big) + \delta_{k,m},
              \quad \delta_{k,m} \sim \mathcal N(0, \sigma^2), \quad
              \alpha^c = \operatorname{softmax}_k\Big(\frac{1}{N}\sum_{m=1}^N y^c(X \odot \hat M_{k,m})\Big),
              \quad M = \sum_k \alpha^c_k A_k

    (torchcam subtracts the unmasked score :math:`y^c(X)`, a constant that the softmax ignores.)
    Unlike :func:`scorecam` (pytorch-grad-cam's convention), the mask is normalized at the layer's
    resolution and upsampled with half-pixel centres (:func:`torchcam_masks`), as in torchcam.
    Cost: ``num_samples × C`` forward passes per image, in chunks of ``chunk_size``; the noise of row
    (image ``b``, sample ``m``, channel ``k``) is ``std * standard_normal_at(key[b], (m, k), (H, W))``
    with ``key`` the ``(B,)`` per-image keys (so an image's noise does not depend on its batch
    position), drawn inside its chunk (never ``N × C × H × W`` at once).

    Returns: contributions ``(B, T, h, w, C)``.

    Reference: Wang et al. "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization", 2020
    (arXiv:2006.14255).
    """

    def noisy(image: Array, mask: Array, b: Array, m: Array, k: Array) -> Array:
        noise = std * standard_normal_at(key[b], (m, k), mask.shape).astype(mask.dtype)
        return (mask + noise)[..., None] * image

    weights = _sampled_mask_weights(activations, images, score, num_samples, chunk_size, noisy)
    return activations[:, None] * weights[:, :, None, None, :]


@register("iscam", batched=True, passes=lambda c, o: c * o["num_samples"])
def iscam(
    activations: Array,
    images: Array,
    score: Callable[[Array, Array], Array],
    num_samples: int = 10,
    chunk_size: int = 32,
) -> Array:
    r"""IS-CAM (Integrated Score-CAM) as torchcam 0.5 defines it: the scores of the masked input scaled
    by an increasing coefficient, averaged over ``N = num_samples`` steps.

    .. math:: c_i = \sum_{j=1}^{i} \frac{j}{N} = \frac{i (i + 1)}{2N}, \quad
              \alpha^c = \operatorname{softmax}_k\Big(\frac{1}{N}\sum_{i=1}^N y^c\big(c_i\,(X \odot H_k)\big)\Big),
              \quad M = \sum_k \alpha^c_k A_k

    with ``H_k`` torchcam's mask (:func:`torchcam_masks`) and, as in torchcam, the cumulative
    coefficient :math:`c_i` (it reaches :math:`(N + 1) / 2`). Deterministic. Cost: ``N × C`` forward
    passes per image, in chunks of ``chunk_size``.

    Returns: contributions ``(B, T, h, w, C)``.

    Reference: Naidu et al. "IS-CAM: Integrated Score-CAM for axiomatic-based explanations", 2020
    (arXiv:2010.03023).
    """

    def scaled(image: Array, mask: Array, b: Array, m: Array, k: Array) -> Array:
        coefficient = ((m + 1) * (m + 2)).astype(image.dtype) / (2 * num_samples)
        return coefficient * (mask[..., None] * image)

    weights = _sampled_mask_weights(activations, images, score, num_samples, chunk_size, scaled)
    return activations[:, None] * weights[:, :, None, None, :]


@register("ablationcam", batched=True, passes=lambda c, o: c)
def ablationcam(
    activations: Array,
    scores: Array,
    ablate: Callable[[Array, Array], Array],
    chunk_size: int = 32,
) -> Array:
    r"""Ablation-CAM for a batch: a channel's weight is the relative drop of the target score when the
    channel is ablated at the layer.

    .. math:: \alpha^c_k = \frac{y^c - y^c_{A_k \to v}}{y^c}, \qquad M = \sum_k \alpha^c_k A_k

    The ablation value ``v`` is 0 when the image's activations have minimum 0 (post-ReLU layers, the
    paper's setting), else ``min(A) - 1e7`` as in pytorch-grad-cam (which, for that case, lowers the
    value again for every channel of a batch; flaxcam uses one value). Where the target score
    :math:`y^c` is exactly 0 the weight is the absolute drop :math:`y^c - y^c_{A_k \to v}` (the
    relative drop is undefined; pytorch-grad-cam divides anyway and returns a NaN map). Cost: ``C``
    forward passes per image (all targets share them), in chunks of ``chunk_size``.

    Args: activations ``(B, h, w, C)``, scores ``(B, T)`` of the unablated images,
    ``ablate(delta, image_index)`` giving the ``(n, T)`` target scores of the images ``image_index``
    with ``delta`` ``(n, h, w, C)`` added to the layer's output.
    Returns: contributions ``(B, T, h, w, C)``.

    Reference: Desai, Ramaswamy. "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
    Gradient-free Localization", WACV 2020.
    """
    batch, _, _, channels = activations.shape
    minimum = jnp.min(activations, axis=(1, 2, 3))
    value = jnp.where(minimum == 0, 0.0, minimum - 1e7)  # (B,)

    def chunk_scores(index: Array) -> Array:
        image_index = index // channels
        channel = index % channels
        selected = activations[image_index]  # (n, h, w, C)
        hit = (jnp.arange(channels)[None, :] == channel[:, None])[:, None, None, :]
        delta = jnp.where(hit, value[image_index][:, None, None, None] - selected, 0.0)
        return ablate(delta, image_index)  # (n, T)

    ablated = chunked_map(chunk_scores, batch * channels, chunk_size)
    ablated = ablated.reshape(batch, channels, -1).transpose(0, 2, 1)  # (B, T, C)
    original = scores[:, :, None]
    weights = (original - ablated) / jnp.where(original == 0, 1.0, original)  # a zero score: the absolute drop
    return activations[:, None] * weights[:, :, None, None, :]
