"""FEM: a gradient-free channel weighting by the k-sigma rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam.methods.registry import register

Array = jax.Array


@register("fem", volumetric=True)
def fem(activations: Array, k: float = 2.0) -> Array:
    r"""FEM (Feature Explanation Method): a channel's weight is the fraction of its positions whose
    activation exceeds the channel's mean by more than ``k`` standard deviations.

    .. math:: \alpha_c = \frac{1}{|\Omega|} \sum_{p \in \Omega} [A_c(p) > \mu_c + k \sigma_c], \qquad
              M = \sum_c \alpha_c A_c

    with :math:`\mu_c`, :math:`\sigma_c` the mean and (population) standard deviation of channel ``c``
    over the positions :math:`\Omega` — ``(h, w)`` for an image layer, ``(d, h, w)`` for a volume (any
    number of leading spatial axes; the channel axis is last). Class-agnostic: no gradients, no target.

    Reference: Fuad, Martin, Giot, Bourqui, Benois-Pineau, Zemmari. "Features understanding in 3D CNNs
    for actions recognition in video", IPTA 2020; pytorch-grad-cam's ``FEM``.
    """
    spatial = tuple(range(activations.ndim - 1))
    threshold = jnp.mean(activations, axis=spatial) + k * jnp.std(activations, axis=spatial)
    weights = jnp.mean((activations > threshold).astype(activations.dtype), axis=spatial)
    return activations * weights
