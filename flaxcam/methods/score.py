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
    height, width = images.shape[1:3]
    rows = jnp.asarray(align_corners_matrix(height, activations.shape[1]))
    cols = jnp.asarray(align_corners_matrix(width, activations.shape[2]))
    total = batch * channels
    chunks = -(-total // chunk_size)
    indices = jnp.arange(chunks * chunk_size).reshape(chunks, chunk_size)

    def chunk_scores(index: Array) -> Array:
        image_index = jnp.minimum(index // channels, batch - 1)  # padding repeats the last image
        channel = index % channels
        maps = activations[image_index, :, :, channel]  # (n, h, w)
        upsampled = jnp.einsum("Hh,nhw,Ww->nHW", rows, maps, cols)
        low = jnp.min(upsampled, axis=(1, 2), keepdims=True)
        high = jnp.max(upsampled, axis=(1, 2), keepdims=True)
        masks = (upsampled - low) / (high - low + 1e-8)
        return score(images[image_index] * masks[..., None], image_index)  # (n, T)

    scores = jax.lax.map(chunk_scores, indices).reshape(chunks * chunk_size, -1)[:total]
    scores = scores.reshape(batch, channels, -1)  # (B, C, T)
    weights = jax.nn.softmax(scores, axis=1).transpose(0, 2, 1)  # (B, T, C)
    return activations[:, None] * weights[:, :, None, None, :]


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
    value again for every channel of a batch; flaxcam uses one value). Cost: ``C`` forward passes per
    image (all targets share them), in chunks of ``chunk_size``.

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
    total = batch * channels
    chunks = -(-total // chunk_size)
    indices = jnp.arange(chunks * chunk_size).reshape(chunks, chunk_size)

    def chunk_scores(index: Array) -> Array:
        image_index = jnp.minimum(index // channels, batch - 1)
        channel = index % channels
        selected = activations[image_index]  # (n, h, w, C)
        hit = (jnp.arange(channels)[None, :] == channel[:, None])[:, None, None, :]
        delta = jnp.where(hit, value[image_index][:, None, None, None] - selected, 0.0)
        return ablate(delta, image_index)  # (n, T)

    ablated = jax.lax.map(chunk_scores, indices).reshape(chunks * chunk_size, -1)[:total]
    ablated = ablated.reshape(batch, channels, -1).transpose(0, 2, 1)  # (B, T, C)
    weights = (scores[:, :, None] - ablated) / scores[:, :, None]
    return activations[:, None] * weights[:, :, None, None, :]
