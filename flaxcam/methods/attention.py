"""Attention methods for vision transformers: LeGrad."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam.methods.registry import register

Array = jax.Array


@register("legrad", attention_layers=True)
def legrad(attention_gradients: tuple[Array, ...]) -> Array:
    r"""LeGrad of one image and one target: the relevance of every key token ``(N,)``.

    .. math:: M = \frac{1}{L} \sum_{l=1}^{L} \frac{1}{H N} \sum_{h=1}^{H} \sum_{q=1}^{N}
              \Big[\frac{\partial s^l}{\partial A^l_{h, q, \cdot}}\Big]_+

    where, for each block :math:`l` named by ``layer=``, :math:`A^l` are its attention probabilities
    ``(H, N, N)`` (heads, queries, keys; the softmax output) and :math:`s^l` its own score of the target
    class: the model's final norm and head on the mean of the block's output tokens
    (``model.project_tokens``). ``attention_gradients[l]`` is :math:`\partial s^l / \partial A^l`, the
    gradient through block :math:`l` only. Positive gradients are averaged over heads and queries, then
    over blocks; the attention values themselves are not multiplied in. The step drops the prefix (class)
    token, lays the patch tokens out on the grid (``reshape=``, default: one prefix token and a square
    grid) and normalizes. This is torchcam 0.5's ``LeGrad``.

    Reference: Bousselham, Boggust, Chaybouti, Strobelt, Kuehne. "LeGrad: An Explainability Method for
    Vision Transformers via Feature Formation Sensitivity", 2024 (arXiv:2404.03214).
    """
    per_block = [jnp.mean(jax.nn.relu(gradients), axis=(0, 1)) for gradients in attention_gradients]
    return jnp.mean(jnp.stack(per_block), axis=0)
