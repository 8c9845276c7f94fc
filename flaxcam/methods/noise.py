"""Noise-averaged methods and the reproducible noise they draw.

Every random draw is a pure function of the PRNG key and of *where* it is used (image, sample,
channel), :func:`standard_normal_at`: the same key gives the same maps whatever the batch size, the
chunk size or the device count, and a test can rebuild the exact draws to feed them to a reference
implementation. The step gives layer ``i`` of a call the key ``jax.random.fold_in(key, i)``, and image
``b`` the key ``jax.random.fold_in(layer_key, image_ids[b])`` where ``image_ids`` are the images' ids
(default: their positions ``0 .. B-1`` in the call): pass each image's index in its data set and one
image gets one map whatever batch, position, device count or resume. The batched noise methods receive
these ``(B,)`` per-image keys as ``key``; the per-image ones (RandomCAM) ``fold_in(image_key, t)`` for
target ``t``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flaxcam.methods.registry import register

Array = jax.Array


def standard_normal_at(key: Array, indices: tuple[int | Array, ...], shape: tuple[int, ...]) -> Array:
    """Standard normal draws of ``shape`` for the position ``indices`` (e.g. ``(image, sample)``):
    ``jax.random.normal`` of the key folded with each index in turn. Pure and order-free."""
    for index in indices:
        key = jax.random.fold_in(key, index)
    return jax.random.normal(key, shape, jnp.float32)


@register("smoothgradcam++", batched=True)
def smoothgradcam_plusplus(
    activations: Array,
    images: Array,
    probe_at: Callable[[Array], tuple[Array, Array]],
    key: Array,
    num_samples: int = 4,
    std: float = 0.3,
) -> Array:
    r"""Smooth Grad-CAM++ as torchcam 0.5 defines it: Grad-CAM++ whose gradient powers are averaged
    over ``num_samples`` copies of the input with Gaussian noise.

    .. math:: \bar D^{(p)}_k = \frac{1}{n}\sum_{m=1}^n \Big(\frac{\partial y^c}{\partial A_k}(X + \epsilon_m)\Big)^p,
              \quad \epsilon_m \sim \mathcal N(0, \sigma^2),

    .. math:: \alpha_k(i, j) = \frac{\bar D^{(2)}_k(i,j)}{2 \bar D^{(2)}_k(i,j) + \sum_{a,b} A_k(a,b)\,
              \bar D^{(3)}_k(a,b) + 10^{-8}}, \qquad
              w_k = \sum_{i,j} \alpha_k(i,j)\, \mathrm{ReLU}(g^{(n)}_k(i,j)), \qquad M = \sum_k w_k A^{(n)}_k

    ``A`` in the denominator is the clean image's activation, summed against :math:`\bar D^{(3)}` at the
    same positions (torchcam's code; its docstring writes :math:`\bar D^{(3)}_k(i,j)`); like torchcam, the ReLU'd gradient
    :math:`g^{(n)}` and the activations :math:`A^{(n)}` that the weights multiply are those of the
    *last* noisy sample (torchcam's hooks keep the last forward pass), and the numerator is
    :math:`\bar D^{(2)}` where the paper writes :math:`\bar D^{(1)}` (torchcam's documented correction).
    Cost: ``num_samples`` forward + backward passes of the batch (all targets of an image share them).

    Args: activations ``(B, h, w, C)`` of the clean images, images ``(B, H, W, c)``,
    ``probe_at(noisy_images) -> (activations (B, h, w, C), gradients (B, T, h, w, C))`` for the same
    targets, ``key`` the ``(B,)`` per-image keys (image ``b``, sample ``m`` draws
    ``std * standard_normal_at(key[b], (m,), (H, W, c))``).
    Returns: contributions ``(B, T, h, w, C)``.

    Reference: Omeiza et al. "Smooth Grad-CAM++: An Enhanced Inference Level Visualization Technique for
    Deep Convolutional Neural Network Models", 2019 (arXiv:1908.01224).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def noisy_probe(sample: Array) -> tuple[Array, Array]:
        noise = jax.vmap(lambda image_key: standard_normal_at(image_key, (sample,), images.shape[1:]))(key)
        return probe_at(images + std * noise.astype(images.dtype))

    shapes = jax.eval_shape(noisy_probe, jnp.int32(0))
    zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

    def step(carry: tuple, sample: Array) -> tuple[tuple, None]:
        square, cube, _, _ = carry
        noisy_activations, gradients = noisy_probe(sample)
        return (square + gradients**2, cube + gradients**3, noisy_activations, gradients), None

    init = (zeros[1], zeros[1], zeros[0], zeros[1])
    (square, cube, last_activations, last_gradients), _ = jax.lax.scan(step, init, jnp.arange(num_samples))
    square, cube = square / num_samples, cube / num_samples
    activation_sums = jnp.sum(cube * activations[:, None], axis=(2, 3), keepdims=True)  # (B, T, 1, 1, C)
    alpha = square / (2 * square + activation_sums + 1e-8)
    weights = jnp.sum(alpha * jax.nn.relu(last_gradients), axis=(2, 3))  # (B, T, C)
    return last_activations[:, None] * weights[:, :, None, None, :]
