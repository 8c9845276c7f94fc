"""FinerCAM: explain a class *against* the classes the model finds most similar to it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam.methods.gradient import gradcam
from flaxcam.methods.registry import register

Array = jax.Array

#: pytorch-grad-cam's defaults: the 3 classes nearest in logit (ranks 1, 2, 3), alpha 1.
FINER_COMPARISONS = 3
FINER_ALPHA = 1.0


def finer_target_scores(
    logits: Array, classes: Array, comparisons: int = FINER_COMPARISONS, alpha: float = FINER_ALPHA
) -> Array:
    r"""FinerCAM's target score ``(B, T)`` for the target ``classes`` ``(B, T)`` of ``logits`` ``(B, K)``.

    .. math:: s = \frac{\sum_{j \in J} p_j \,(y_c - \alpha\, y_j)}{\sum_{j \in J} p_j + 10^{-9}}, \qquad
              p = \operatorname{softmax}(y)

    where :math:`J` are the ``comparisons`` classes whose logits are nearest to :math:`y_c` (by
    :math:`|y_j - y_c|`, the target excluded). Gradients flow through :math:`y` and :math:`p`; the choice
    of :math:`J` is piecewise constant. Equals pytorch-grad-cam's ``FinerWeightedTarget`` with the
    comparison classes ``FinerCAM`` picks (ranks 1..3 of the sorted differences).
    """
    if not 1 <= comparisons < logits.shape[-1]:
        raise ValueError(
            f"comparisons must be between 1 and the number of classes - 1 ({logits.shape[-1] - 1}), got {comparisons}"
        )
    target_logits = jnp.take_along_axis(logits, classes, axis=1)  # (B, T)
    distance = jnp.abs(jax.lax.stop_gradient(logits)[:, None, :] - jax.lax.stop_gradient(target_logits)[..., None])
    own = jax.nn.one_hot(classes, logits.shape[-1], dtype=bool)
    distance = jnp.where(own, jnp.inf, distance)  # (B, T, K)
    nearest = jax.lax.top_k(-distance, comparisons)[1]  # (B, T, J)
    probabilities = jax.nn.softmax(logits, axis=-1)
    compared = jnp.take_along_axis(jnp.broadcast_to(logits[:, None], distance.shape), nearest, axis=-1)
    weights = jnp.take_along_axis(jnp.broadcast_to(probabilities[:, None], distance.shape), nearest, axis=-1)
    numerator = jnp.sum(weights * (target_logits[..., None] - alpha * compared), axis=-1)
    return numerator / (jnp.sum(weights, axis=-1) + 1e-9)


@register("finercam", score_transform=finer_target_scores)
def finercam(activations: Array, gradients: Array) -> Array:
    r"""FinerCAM: Grad-CAM of :func:`finer_target_scores` — the target class's logit minus those of the
    3 classes most similar to it, weighted by their probabilities — which keeps the regions that tell
    the class apart from its look-alikes and drops those they share.

    .. math:: \alpha_k = \frac{1}{hw} \sum_{x,y} \frac{\partial s}{\partial A_k(x,y)}, \qquad
              M = \sum_k \alpha_k A_k

    with :math:`s` the FinerCAM score (``gradients`` are its gradients; the pipeline applies the score).
    pytorch-grad-cam's ``FinerCAM`` with its default ``base_method=GradCAM``, ``alpha=1`` and
    comparison classes ``[1, 2, 3]``.

    Reference: Zhang et al. "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", 2025 (arXiv:2501.11309).
    """
    return gradcam(activations, gradients)
