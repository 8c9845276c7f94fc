"""Principal-component methods (EigenCAM, EigenGradCAM) and the ``eigen_smooth`` reduction."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam.methods.registry import register

Array = jax.Array


def _top_right_singular_vector(centred: Array) -> Array:
    r"""The first right singular vector :math:`v_1` of the ``(n, C)`` matrix :math:`X`, from the
    eigendecomposition of its smaller Gram matrix (``0`` when :math:`X = 0`).

    * :math:`C \le n`: :math:`v_1` is the top eigenvector of :math:`X^\top X` (``C × C``).
    * :math:`n < C`: with :math:`u_1` the top eigenvector of :math:`X X^\top` (``n × n``, 49 × 49 at
      7 × 7), :math:`X^\top u_1 = \sigma_1 v_1`, so :math:`v_1 = X^\top u_1 / \lVert X^\top u_1 \rVert`.

    Both follow from :math:`X = U \Sigma V^\top`: :math:`X^\top X = V \Sigma^2 V^\top` and
    :math:`X X^\top = U \Sigma^2 U^\top`, whose top eigenpairs are :math:`(\sigma_1^2, v_1)` and
    :math:`(\sigma_1^2, u_1)`. Products in full float32 (``Precision.HIGHEST``; no TF32 on GPU).
    """
    rows, columns = centred.shape
    highest = jax.lax.Precision.HIGHEST
    if columns <= rows:
        _, vectors = jnp.linalg.eigh(jnp.matmul(centred.T, centred, precision=highest))
        return vectors[:, -1]
    _, vectors = jnp.linalg.eigh(jnp.matmul(centred, centred.T, precision=highest))
    direction = jnp.matmul(centred.T, vectors[:, -1], precision=highest)
    norm = jnp.linalg.norm(direction)
    return jnp.where(norm > 0, direction / jnp.where(norm > 0, norm, 1.0), 0.0)


def first_component_projection(contributions: Array) -> Array:
    r"""Project ``(h, w, C)`` onto its first principal component, with a deterministic sign.

    With :math:`X` the ``(hw, C)`` matrix of the contributions, centred per channel (column), and
    :math:`v_1` its first right singular vector, the map is :math:`X v_1 = \sigma_1 u_1` reshaped to
    ``(h, w)`` (pytorch-grad-cam's ``get_2d_projection``: ``U, S, VT = svd(X); X @ VT[0]``).

    :math:`v_1` comes from the eigendecomposition of the smaller Gram matrix, :math:`X^\top X`
    (``C × C``) or :math:`X X^\top` (``hw × hw``), instead of an SVD of :math:`X`: same
    :math:`v_1` (see :func:`_top_right_singular_vector`), and a 49 × 49 ``eigh`` at a 7 × 7 layer
    costs far less than the SVD of the 49 × 512 matrix, which on XLA CPU cost more than the
    network's forward pass. The map is then computed as :math:`X v_1` in both cases, so its
    accuracy does not depend on :math:`\sqrt{\lambda_1}`. When :math:`X = 0` (a zero or
    spatially constant map) the map is 0, without NaN; when :math:`\sigma_1` is repeated the
    first component is not unique (as with the SVD) and any unit vector of the top singular
    subspace may be returned.

    The sign of :math:`v_1` is arbitrary (SVD/eigh implementations differ between machines), so
    flaxcam flips the map to correlate positively with the channel sum :math:`\sum_k X_k` — the map
    that plain summation would give. NaNs are replaced by zeros first, as in pytorch-grad-cam's
    ``get_2d_projection``.
    """
    height, width, channels = contributions.shape
    matrix = jnp.nan_to_num(contributions).reshape(height * width, channels)
    centred = matrix - jnp.mean(matrix, axis=0)
    projection = jnp.matmul(centred, _top_right_singular_vector(centred), precision=jax.lax.Precision.HIGHEST)
    agreement = jnp.sum(projection * jnp.sum(matrix, axis=1))
    return (jnp.where(agreement < 0, -projection, projection)).reshape(height, width)


def sign_corrected_projection(contributions: Array) -> Array:
    r"""The first principal component of ``(h, w, C)`` (:func:`first_component_projection`), signed so
    that its largest magnitude is positive: :math:`P \leftarrow -P` when :math:`|\min P| > |\max P|`
    (Seg-Eigen-CAM's sign correction, eq. 13; pytorch-grad-cam's
    ``get_2d_projection_with_sign_correction``)."""
    projection = first_component_projection(contributions)
    return jnp.where(jnp.abs(jnp.min(projection)) > jnp.abs(jnp.max(projection)), -projection, projection)


@register("eigencam", reduction="projection")
def eigencam(activations: Array) -> Array:
    r"""EigenCAM: the first principal component of the activations (class-agnostic, no gradients).

    .. math:: M = \operatorname{reshape}(X v_1), \quad X = A - \bar A \text{ (per channel)}

    The map is oriented to correlate positively with the channel-summed activation
    (pytorch-grad-cam's sign follows the SVD and can flip between machines).

    Reference: Muhammad, Yeasin. "Eigen-CAM: Class Activation Map using Principal Components", IJCNN
    2020 (arXiv:2008.00299).
    """
    return activations


@register("eigengradcam", reduction="projection")
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
    kernel = (
        kernel - jnp.mean(kernel, axis=0, keepdims=True) - jnp.mean(kernel, axis=1, keepdims=True) + jnp.mean(kernel)
    )
    values, vectors = jnp.linalg.eigh(kernel)
    projection = vectors[:, -1] * jnp.sqrt(jnp.maximum(values[-1], 0.0))
    agreement = jnp.sum(projection * jnp.sum(matrix, axis=1))
    return jnp.where(agreement < 0, -projection, projection).reshape(height, width)


@register("kpcacam", reduction="kernel_projection")
def kpcacam(activations: Array) -> Array:
    r"""KPCA-CAM: the first *kernel* principal component of the activations (no gradients).

    The contributions are the activations; :func:`kernel_pca_projection` (sigmoid kernel) reduces them.

    Reference: Karmani et al. "KPCA-CAM: Visual Explainability of Deep Computer Vision Models using
    Kernel PCA", 2024 (arXiv:2410.00267); pytorch-grad-cam's ``KPCA_CAM``.
    """
    return activations


@register("segeigencam", reduction="signed_projection")
def segeigencam(activations: Array, gradients: Array) -> Array:
    r"""Seg-Eigen-CAM: the first principal component of :math:`|g| \odot A`, sign-corrected.

    .. math:: M = \pm \operatorname{reshape}(X v_1), \quad X = |g| \odot A - \overline{|g| \odot A}
              \text{ (per channel)}, \quad \pm: \ |\min M| \le |\max M|

    The absolute gradient weighs each position (pixel-wise importance, both signs of the gradient) and
    the map's sign is chosen so that its largest magnitude is positive
    (:func:`sign_corrected_projection`). Made for segmentation models with
    :class:`flaxcam.targets.Segmentation` targets; works with any target.

    Reference: Chung, Ying. "Seg-Eigen-CAM: Eigen-Value-Based Visual Explanations for Semantic
    Segmentation Models", Applied Sciences 15(13) 7562, 2025; pytorch-grad-cam's ``SegEigenCAM``.
    """
    return jnp.abs(gradients) * activations
