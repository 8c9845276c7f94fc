"""Principal-component methods (EigenCAM, EigenGradCAM) and the ``eigen_smooth`` reduction."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def first_component_projection(contributions: Array) -> Array:
    r"""Project ``(h, w, C)`` onto its first principal component, with a deterministic sign.

    With :math:`X` the ``(hw, C)`` matrix of the contributions, centred per channel (column), and
    :math:`v_1` its first right singular vector, the map is :math:`X v_1` reshaped to ``(h, w)``.
    The sign of :math:`v_1` is arbitrary (SVD implementations differ between machines), so flaxcam
    flips the map to correlate positively with the channel sum :math:`\sum_k X_k` — the map that plain
    summation would give. NaNs are replaced by zeros first, as in pytorch-grad-cam's
    ``get_2d_projection``.
    """
    height, width, channels = contributions.shape
    matrix = jnp.nan_to_num(contributions).reshape(height * width, channels)
    centred = matrix - jnp.mean(matrix, axis=0)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    agreement = jnp.sum(projection * jnp.sum(matrix, axis=1))
    return (jnp.where(agreement < 0, -projection, projection)).reshape(height, width)


def eigencam(activations: Array) -> Array:
    r"""EigenCAM: the first principal component of the activations (class-agnostic, no gradients).

    .. math:: M = \operatorname{reshape}(X v_1), \quad X = A - \bar A \text{ (per channel)}

    The map is oriented to correlate positively with the channel-summed activation
    (pytorch-grad-cam's sign follows the SVD and can flip between machines).

    Reference: Muhammad, Yeasin. "Eigen-CAM: Class Activation Map using Principal Components", IJCNN
    2020 (arXiv:2008.00299).
    """
    return activations


def eigengradcam(activations: Array, gradients: Array) -> Array:
    r"""EigenGradCAM: the first principal component of gradient × activation (class-discriminative).

    .. math:: M = \operatorname{reshape}(X v_1), \quad X = g \odot A - \overline{g \odot A}

    oriented to correlate positively with :math:`\sum_k g_k A_k` (the HiResCAM map).

    Reference: pytorch-grad-cam's ``EigenGradCAM`` (Gildenblat et al.), after Eigen-CAM
    (arXiv:2008.00299).
    """
    return gradients * activations
