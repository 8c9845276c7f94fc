"""CAM: class activation mapping with the weights of a global-pooling → Dense head."""

from __future__ import annotations

import jax

from flaxcam.methods.registry import register

Array = jax.Array


@register("cam")
def cam(activations: Array, class_weights: Array) -> Array:
    r"""Class activation map of one image and one class, as per-channel contributions ``(h, w, C)``.

    .. math:: M_c(x, y) = \sum_k w^c_k \, A_k(x, y)

    where :math:`A_k` is channel ``k`` of the last convolutional features ``activations`` ``(h, w, C)``
    and :math:`w^c` ``(C,)`` the Dense weights of class ``c`` after global average (or max) pooling. The
    bias is omitted: it shifts every pixel equally.

    Reference: Zhou, Khosla, Lapedriza, Oliva, Torralba. "Learning Deep Features for Discriminative
    Localization", CVPR 2016 (arXiv:1512.04150).
    """
    return activations * class_weights
