"""Gradient-weighted methods: the channel weights come from d(score)/d(activations).

Every method returns the per-channel *contributions* ``C_k(x, y)`` ``(h, w, C)`` of one image and one
target; the map is their sum over channels, :math:`M(x, y) = \\sum_k C_k(x, y)` (or, with
``eigen_smooth``, their first principal component; see :mod:`flaxcam.methods.eigen`). ``activations``
``A`` and ``gradients`` :math:`g = \\partial y^c / \\partial A` are ``(h, w, C)``. The ReLU applied to
the map by the papers is done by flaxcam's post-processing, as in pytorch-grad-cam.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxcam.methods.registry import register

Array = jax.Array


@register("gradcam", volumetric=True)
def gradcam(activations: Array, gradients: Array) -> Array:
    r"""Grad-CAM: channels weighted by their spatially averaged gradient.

    .. math:: \alpha_k = \frac{1}{hw} \sum_{x,y} g_k(x,y), \qquad M(x, y) = \sum_k \alpha_k A_k(x, y)

    At the last layer of a GAP + Dense model :math:`\alpha_k = w^c_k / (hw)`, so Grad-CAM is CAM / hw.

    Reference: Selvaraju et al. "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017 (arXiv:1610.02391).
    """
    return activations * jnp.mean(gradients, axis=tuple(range(gradients.ndim - 1)))  # (h, w) or (d, h, w)


@register("hirescam", volumetric=True)
def hirescam(activations: Array, gradients: Array) -> Array:
    r"""HiResCAM: element-wise gradient × activation (no spatial averaging).

    .. math:: M(x, y) = \sum_k g_k(x,y) A_k(x, y)

    Faithful to the model's computation for architectures ending in global average pooling + Dense,
    where it equals Grad-CAM up to a constant factor.

    Reference: Draelos, Carin. "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", 2020 (arXiv:2011.08891).
    """
    return gradients * activations


@register("gradcam_elementwise")
def gradcam_elementwise(activations: Array, gradients: Array) -> Array:
    r"""Grad-CAM element-wise: the ReLU of each gradient × activation term before the channel sum.

    .. math:: M(x, y) = \sum_k \max\left(0, g_k(x,y) A_k(x, y)\right)

    Reference: pytorch-grad-cam's ``GradCAMElementWise`` (Gildenblat et al.,
    github.com/jacobgil/pytorch-grad-cam), a HiResCAM variant.
    """
    return jax.nn.relu(gradients * activations)


@register("xgradcam")
def xgradcam(activations: Array, gradients: Array) -> Array:
    r"""XGrad-CAM: channel weights are activation-weighted gradients.

    .. math:: \alpha_k = \sum_{x,y} \frac{A_k(x,y)}{\sum_{x',y'} A_k(x',y') + \epsilon} g_k(x,y),
              \qquad M = \sum_k \alpha_k A_k

    with :math:`\epsilon = 10^{-7}` (pytorch-grad-cam's value).

    Reference: Fu et al. "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
    BMVC 2020 (arXiv:2008.02312).
    """
    sum_activations = jnp.sum(activations, axis=(0, 1), keepdims=True)
    weights = jnp.sum(gradients * activations / (sum_activations + 1e-7), axis=(0, 1))
    return activations * weights


@register("layercam", volumetric=True)
def layercam(activations: Array, gradients: Array) -> Array:
    r"""LayerCAM: each activation weighted by its own positive gradient.

    .. math:: M(x, y) = \sum_k \max\left(0, g_k(x,y)\right) A_k(x, y)

    Reference: Jiang et al. "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
    IEEE TIP 2021.
    """
    return jax.nn.relu(gradients) * activations


@register("gradcam++")
def gradcam_plusplus(activations: Array, gradients: Array, eps: float = 1e-6) -> Array:
    r"""Grad-CAM++ with the closed form for an exponential score (pytorch-grad-cam's formula).

    The higher derivatives of :math:`\exp(y^c)` are replaced by powers of :math:`g`:

    .. math:: a_k(x,y) = \frac{g_k^2}{2 g_k^2 + \sum_{x',y'} A_k(x',y')\, g_k^3 + \epsilon}
              \;(0 \text{ where } g_k = 0), \qquad
              \alpha_k = \sum_{x,y} a_k(x,y) \max(0, g_k(x,y)), \qquad M = \sum_k \alpha_k A_k

    with :math:`\epsilon = 10^{-6}` (``eps``). The powers of the gradient equal the true second and
    third derivatives only when the score is the exponential of a function that is linear in ``A``;
    :func:`gradcam_plusplus_exact` uses the true ones.

    Reference: Chattopadhay et al. "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
    Networks", WACV 2018 (arXiv:1710.11063).
    """
    grads_2 = gradients**2
    grads_3 = grads_2 * gradients
    sum_activations = jnp.sum(activations, axis=(0, 1), keepdims=True)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + eps)
    alpha = jnp.where(gradients != 0, alpha, 0.0)
    weights = jnp.sum(jax.nn.relu(gradients) * alpha, axis=(0, 1))
    return activations * weights


@register("gradcam++exact")
def gradcam_plusplus_exact(
    activations: Array, gradients: Array, second_derivatives: Array, third_derivatives: Array
) -> Array:
    r"""Grad-CAM++ with the true second and third derivatives of the score (Chattopadhyay et al., eq. 19).

    .. math:: a_k(x,y) = \frac{\partial^2 Y / \partial A_k(x,y)^2}
              {2\, \partial^2 Y / \partial A_k(x,y)^2
               + \sum_{x',y'} A_k(x',y')\; \partial^3 Y / \partial A_k(x,y)^3}
              \;(0 \text{ where the denominator is } 0), \qquad
              \alpha_k = \sum_{x,y} a_k(x,y) \max\left(0, \frac{\partial Y}{\partial A_k(x,y)}\right),
              \qquad M = \sum_k \alpha_k A_k

    for an arbitrary differentiable score :math:`Y` (``gradients``, ``second_derivatives`` and
    ``third_derivatives`` are the elementwise first, second and third derivatives, each ``(h, w, C)``;
    see :func:`flaxcam.probe.derivative_diagonals`). The paper derives eq. 19 for any smooth score and
    then specializes it to :math:`Y = \exp(S)`: when :math:`S` is piecewise linear in ``A`` (a ReLU
    network's logit), :math:`\partial^n Y / \partial A^n = Y\, g^n` with :math:`g = \partial S/\partial A`,
    which gives the powers-of-the-gradient formula of :func:`gradcam_plusplus` (pytorch-grad-cam,
    torchcam) — and the same map, the common factor :math:`Y` cancelling in the normalization. For other
    scores (a softmax probability, a network with smooth activations such as GELU or SiLU) the two
    differ, and only this one follows eq. 19. For a score that is itself piecewise linear (the raw logit
    of a ReLU network) the second and third derivatives vanish and the map is zero: explain
    ``exp(logit)`` (``output_fn=jnp.exp``) or the softmax (``score="softmax"``) instead.

    Cost: the diagonals take one third-order forward-mode pass of the network after the layer per
    element of the layer, :math:`h \cdot w \cdot C` passes per batch (vs one backward pass for
    :func:`gradcam_plusplus`), chunked on device.

    Reference: Chattopadhay, Sarkar, Howlader, Balasubramanian. "Grad-CAM++: Improved Visual
    Explanations for Deep Convolutional Networks", WACV 2018 (arXiv:1710.11063), eq. 19.
    """
    sum_activations = jnp.sum(activations, axis=(0, 1), keepdims=True)
    denominator = 2 * second_derivatives + sum_activations * third_derivatives
    safe = jnp.where(denominator != 0, denominator, 1.0)
    alpha = jnp.where(denominator != 0, second_derivatives / safe, 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(gradients), axis=(0, 1))
    return activations * weights


@register("shapleycam")
def shapleycam(activations: Array, gradients: Array, hvp: Array) -> Array:
    r"""ShapleyCAM: channel weights from the gradient and the Hessian-vector product with the activations.

    .. math:: \alpha_k = \frac{1}{hw} \sum_{x,y} \left(g - \tfrac12 H A\right)_k(x,y), \qquad
              M = \sum_k \alpha_k A_k

    where :math:`(H A)_i = \sum_j \partial^2 y^c / \partial A_i \partial A_j \, A_j` (``hvp``
    ``(h, w, C)``, see :func:`flaxcam.probe.probe_hessian`). A second-order Taylor estimate of each
    channel's Shapley value. When the score is piecewise linear in ``A`` (a ReLU network's logit)
    :math:`H = 0` and ShapleyCAM equals Grad-CAM; it differs for the softmax probability or for the
    ReST target the paper recommends.

    Reference: Cai. "CAMs as Shapley Value-based Explainers", 2025 (arXiv:2501.06261);
    pytorch-grad-cam's ``ShapleyCAM``.
    """
    return activations * jnp.mean(gradients - 0.5 * hvp, axis=(0, 1))
