"""FullGrad: input-gradient × input plus the bias-gradients of every convolution and BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam import ops
from flaxcam.methods.registry import register

Array = jax.Array


def _normalized_channel_sum(values: Array) -> Array:
    """``(h, w, C)`` → ``(h, w)``: each channel min-max normalized over space, then summed."""
    return jnp.sum(ops.minmax_normalize(jnp.moveaxis(values, -1, 0)), axis=0)


@register("fullgrad", reduction="none", bias_layers=True)
def fullgrad(
    images: Array, input_gradients: Array, bias_gradients: tuple[Array, ...], biases: tuple[Array, ...]
) -> Array:
    r"""FullGrad saliency of one image and one target, at the input resolution ``(H, W)``.

    .. math:: M = \sum_{c} N\big(|x_c \odot \nabla_{x_c} y|\big)
              + \sum_{l} U_{H \times W}\Big(\sum_{c} N\big(|b^l_c\, \nabla_{z^l_c} y|\big)\Big)

    where :math:`x` is the input ``images`` ``(H, W, 3)`` and ``input_gradients`` its gradient; for each
    layer :math:`l` with a bias — every convolution and BatchNorm, whatever ``layer=`` says —
    :math:`z^l` is its output, ``bias_gradients[l]`` :math:`= \nabla_{z^l} y` ``(h, w, C)`` and
    ``biases[l]`` :math:`= b^l` ``(C,)`` its bias (a BatchNorm's effective bias
    :math:`\beta - \mu\gamma/\sqrt{\sigma^2 + \epsilon}`, see :func:`flaxcam.probe.effective_bias`).
    :math:`N` min-max normalizes each channel map over space (eps :math:`10^{-7}`) and :math:`U` is
    bilinear resizing to the input size. This is pytorch-grad-cam 1.5.7's ``FullGrad`` (absolute value
    as post-processing, per-channel normalization, sum); it resizes each channel before summing, which
    is the same map because resizing is linear. The paper's "completeness" (the map's parts sum to the
    output) concerns the un-post-processed terms.

    Cost: one forward and one backward pass through the whole network (down to the input).

    Reference: Srinivas, Fleuret. "Full-Gradient Representation for Neural Network Visualization",
    NeurIPS 2019 (arXiv:1905.00780).
    """
    size = images.shape[:2]
    saliency = _normalized_channel_sum(jnp.abs(input_gradients * images))
    for gradient, bias in zip(bias_gradients, biases):
        layer_map = _normalized_channel_sum(jnp.abs(gradient * bias))
        saliency = saliency + ops.resize_maps(layer_map, size)
    return saliency
