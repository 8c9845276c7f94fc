"""Gradient-weighted methods: the channel weights come from d(score)/d(activations)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def gradcam(activations: Array, gradients: Array) -> Array:
    r"""Grad-CAM of one image and one target.

    .. math:: \alpha_k = \frac{1}{hw} \sum_{x,y} \frac{\partial y^c}{\partial A_k(x,y)}, \qquad
              M(x, y) = \sum_k \alpha_k A_k(x, y)

    ``activations`` and ``gradients`` are ``(h, w, C)``. The ReLU of the paper is applied by the caller
    (flaxcam's post-processing), as in pytorch-grad-cam. At the last layer of a GAP + Dense model
    :math:`\alpha_k = w^c_k / (hw)`, so Grad-CAM is CAM divided by ``hw``.

    Reference: Selvaraju et al. "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017 (arXiv:1610.02391).
    """
    weights = jnp.mean(gradients, axis=(0, 1))
    return jnp.einsum("hwc,c->hw", activations, weights)
