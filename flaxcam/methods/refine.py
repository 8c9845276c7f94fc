"""How the maps of several layers become one: pytorch-grad-cam's mean, or RefineCAM's product."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp

from flaxcam import ops
from flaxcam.methods.gradient import gradcam_plusplus
from flaxcam.methods.registry import register

Array = jax.Array


def mean_fusion(upsampled: Sequence[Array], spatial: int = 2) -> Array:
    r"""pytorch-grad-cam's multi-layer aggregation: the mean of the per-layer maps (each normalized at
    its layer, upsampled to the input and clipped at 0), normalized again:
    :math:`N\big(\frac1L \sum_l \max(U(M_l), 0)\big)`. (Bilinear upsampling never goes below 0; the
    cubic-spline zoom of volumes can, and pytorch-grad-cam clips it.)"""
    return ops.minmax_normalize(
        cast(Array, sum(jnp.maximum(m, 0) for m in upsampled)) / len(upsampled), spatial=spatial
    )


def product_fusion(upsampled: Sequence[Array], spatial: int = 2) -> Array:
    r"""RefineCAM's fusion: the product of the per-layer maps, each normalized again at the input
    resolution, then normalized: :math:`N\big(\prod_l N(U(M_l))\big)` with :math:`N` the per-map
    min-max normalization (``ops.minmax_normalize``). A region survives only where every layer agrees,
    which removes the noise of early layers' maps."""
    normalized = (ops.minmax_normalize(m, spatial=spatial) for m in upsampled)
    return ops.minmax_normalize(functools.reduce(lambda a, b: a * b, normalized), spatial=spatial)


#: ``Method.layer_fusion`` → the function fusing the per-layer upsampled maps ``[(B, T, H, W)]`` (or
#: volumes ``(B, T, D, H, W)`` with ``spatial=3``).
LAYER_FUSIONS = {"mean": mean_fusion, "product": product_fusion}


@register("refinecam", layer_fusion="product")
def refinecam(activations: Array, gradients: Array, eps: float = 1e-6) -> Array:
    r"""RefineCAM: Grad-CAM++ at each of several layers (``layer=[...]``), the maps multiplied.

    .. math:: M = N\Big(\prod_{l} N\big(U(N(\operatorname{ReLU} M^{++}_l))\big)\Big)

    with :math:`M^{++}_l` the Grad-CAM++ map of layer ``l`` (:func:`gradcam_plusplus`), ``U`` bilinear
    upsampling to the input and ``N`` per-map min-max normalization: :func:`product_fusion` of the
    per-layer maps. With one layer it is Grad-CAM++. pytorch-grad-cam's ``RefineCAM`` (its default
    ``base_method=GradCAMPlusPlus``; its loop that would rescale each map by its maximum does not change
    the maps, which are already in [0, 1]). torchcam's ``RefineCAM`` differs: it multiplies the maps at
    the *largest layer's* resolution (not the input's) and uses torchcam's Grad-CAM++ (see
    docs/methods.md).

    Reference: "How to Evaluate and Refine your CAM" (arXiv:2605.14641); pytorch-grad-cam's
    ``RefineCAM``.
    """
    return gradcam_plusplus(activations, gradients, eps)
