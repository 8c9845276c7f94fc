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


def kernel_pca_projection(contributions: Array, gamma: float | None = None, coef0: float = 1.0) -> Array:
    r"""Project ``(h, w, C)`` onto its first kernel principal component (sigmoid kernel).

    With :math:`X` the ``(hw, C)`` matrix centred per channel,
    :math:`K = \tanh(\gamma X X^\top + c_0)` (``gamma`` defaults to ``1 / C``, ``coef0`` to 1, as in
    scikit-learn's ``KernelPCA``), :math:`\tilde K` the doubly centred kernel and :math:`(\lambda_1, v_1)`
    its top eigenpair, the map is :math:`v_1 \sqrt{\lambda_1}` reshaped to ``(h, w)`` — scikit-learn's
    ``KernelPCA(n_components=1, kernel="sigmoid").fit_transform``, which pytorch-grad-cam's ``KPCA_CAM``
    calls. Oriented like :func:`first_component_projection` (positive correlation with the channel sum).
    """
    height, width, channels = contributions.shape
    matrix = jnp.nan_to_num(contributions).reshape(height * width, channels)
    centred = matrix - jnp.mean(matrix, axis=0)
    scale = 1.0 / channels if gamma is None else gamma
    kernel = jnp.tanh(scale * centred @ centred.T + coef0)
    kernel = kernel - jnp.mean(kernel, axis=0, keepdims=True) - jnp.mean(kernel, axis=1, keepdims=True) + jnp.mean(kernel)
    values, vectors = jnp.linalg.eigh(kernel)
    projection = vectors[:, -1] * jnp.sqrt(jnp.maximum(values[-1], 0.0))
    agreement = jnp.sum(projection * jnp.sum(matrix, axis=1))
    return jnp.where(agreement < 0, -projection, projection).reshape(height, width)


def kpcacam(activations: Array) -> Array:
    r"""KPCA-CAM: the first *kernel* principal component of the activations (no gradients).

    The contributions are the activations; :func:`kernel_pca_projection` (sigmoid kernel) reduces them.

    Reference: Karmani et al. "KPCA-CAM: Visual Explainability of Deep Computer Vision Models using
    Kernel PCA", 2024 (arXiv:2410.00267); pytorch-grad-cam's ``KPCA_CAM``.
    """
    return activations
