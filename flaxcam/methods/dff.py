"""Deep Feature Factorization: non-negative matrix factorization of a layer's activations into concepts."""

from __future__ import annotations

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.methods.registry import register

Array = jax.Array


class NMFResult(NamedTuple):
    """``V ≈ W H``: ``basis`` W ``(m, k)``, ``coefficients`` H ``(k, n)``, the objective
    :math:`\tfrac12 \\lVert V - W H \rVert_F^2` at the end and the number of ``iterations`` run."""

    basis: Array
    coefficients: Array
    objective: Array
    iterations: Array


def nmf_objective(matrix: Array, basis: Array, coefficients: Array) -> Array:
    r""":math:`\tfrac12 \lVert V - W H \rVert_F^2` (scikit-learn's ``NMF`` objective, Frobenius loss)."""
    return 0.5 * jnp.sum((matrix - basis @ coefficients) ** 2)


def nmf_initialization(matrix: Array, components: int, seed: int) -> tuple[Array, Array]:
    r"""scikit-learn's ``init='random'``: :math:`H, W = s\,|Z|` with :math:`s = \sqrt{\bar V / k}` and
    :math:`Z` standard normal from NumPy's ``RandomState(seed)`` (``H`` drawn first, then ``W``): the
    initialization of pytorch-grad-cam's ``dff`` for ``seed=0``. Only the draws are made on the host (they
    depend on the shapes and the seed alone)."""
    rows, columns = matrix.shape
    random = np.random.RandomState(seed)
    coefficients_draw = random.standard_normal((components, columns))
    basis_draw = random.standard_normal((rows, components))
    scale = jnp.sqrt(jnp.mean(matrix) / components)
    basis = jnp.abs(scale * jnp.asarray(basis_draw, matrix.dtype))
    coefficients = jnp.abs(scale * jnp.asarray(coefficients_draw, matrix.dtype))
    return basis, coefficients


def _coordinate_descent_pass(basis: Array, gram: Array, target: Array) -> tuple[Array, Array]:
    r"""One pass of coordinate descent over the columns ``t`` of ``W`` for
    :math:`\min_{W \ge 0} \tfrac12 \lVert V - W H \rVert_F^2`, with :math:`G = H H^\top` (``gram``) and
    :math:`P = V H^\top` (``target``), every row at once:

    .. math:: g = W G_{:,t} - P_{:,t}, \qquad W_{:,t} \leftarrow \max\big(0,\ W_{:,t} - g / G_{tt}\big)

    (columns in order, each using the columns already updated; no change where :math:`G_{tt} = 0`).
    Returns the new ``W`` and the summed projected-gradient magnitude :math:`\sum |g^P|`,
    :math:`g^P = \min(0, g)` where :math:`W = 0`, else :math:`g` (scikit-learn's ``violation``)."""

    def column(t: int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        basis, violation = carry
        gradient = jnp.matmul(basis, gram[:, t], precision=jax.lax.Precision.HIGHEST) - target[:, t]
        current = basis[:, t]
        projected = jnp.where(current == 0, jnp.minimum(gradient, 0), gradient)
        hessian = gram[t, t]
        updated = jnp.where(
            hessian != 0, jnp.maximum(current - gradient / jnp.where(hessian != 0, hessian, 1), 0), current
        )
        return basis.at[:, t].set(updated), violation + jnp.sum(jnp.abs(projected))

    return jax.lax.fori_loop(0, gram.shape[0], column, (basis, jnp.zeros((), basis.dtype)))


def nmf_update(matrix: Array, basis: Array, coefficients: Array) -> tuple[Array, Array, Array]:
    r"""One iteration of the coordinate-descent NMF solver (Cichocki & Phan's HALS, scikit-learn's
    ``solver='cd'``): a pass over the columns of ``W`` (:func:`_coordinate_descent_pass` with
    :math:`G = HH^\top`, :math:`P = VH^\top`), then over the rows of ``H`` (the same on
    :math:`V^\top \approx H^\top W^\top` with :math:`G = W^\top W`, :math:`P = V^\top W`, the new ``W``).
    Returns ``(W, H, violation)``; the objective does not increase."""
    highest = jax.lax.Precision.HIGHEST
    basis, violation_w = _coordinate_descent_pass(
        basis,
        jnp.matmul(coefficients, coefficients.T, precision=highest),
        jnp.matmul(matrix, coefficients.T, precision=highest),
    )
    transposed, violation_h = _coordinate_descent_pass(
        coefficients.T, jnp.matmul(basis.T, basis, precision=highest), jnp.matmul(matrix.T, basis, precision=highest)
    )
    return basis, transposed.T, violation_w + violation_h


def nmf(matrix: Array, components: int, seed: int = 0, max_iterations: int = 200, tol: float = 1e-4) -> NMFResult:
    r"""Non-negative matrix factorization :math:`V \approx W H` of a non-negative ``(m, n)`` matrix,
    :math:`\min_{W, H \ge 0} \tfrac12 \lVert V - WH \rVert_F^2`, on device: :func:`nmf_update` from
    :func:`nmf_initialization` until the violation falls to ``tol`` times the first iteration's or
    ``max_iterations`` (``lax.while_loop``) — scikit-learn's ``NMF(init='random', solver='cd')`` with
    its defaults, which pytorch-grad-cam's ``dff`` calls. Deterministic from ``seed``.

    Reference: Cichocki, Phan. "Fast local algorithms for large scale nonnegative matrix and tensor
    factorizations", IEICE Trans. Fundamentals E92-A(3), 2009; Lee, Seung, NeurIPS 2000.
    """
    rows, columns = matrix.shape
    if not 1 <= components <= min(rows, columns):
        raise ValueError(
            f"n_components must be between 1 and min(channels, positions) = {min(rows, columns)} "
            f"for a ({rows}, {columns}) matrix; got {components}"
        )
    basis, coefficients = nmf_initialization(matrix, components, seed)

    def running(state: tuple) -> Array:
        _, _, iteration, violation, first = state
        return (iteration < max_iterations) & (
            (iteration < 2) | ((first > 0) & (violation / jnp.where(first > 0, first, 1) > tol))
        )

    def step(state: tuple) -> tuple:
        basis, coefficients, iteration, _, first = state
        basis, coefficients, violation = nmf_update(matrix, basis, coefficients)
        first = jnp.where(iteration == 0, violation, first)
        return basis, coefficients, iteration + 1, violation, first

    zero = jnp.zeros((), matrix.dtype)
    basis, coefficients, iterations, _, _ = jax.lax.while_loop(running, step, (basis, coefficients, 0, zero, zero))
    return NMFResult(basis, coefficients, nmf_objective(matrix, basis, coefficients), cast(Array, iterations))


class Factorization(NamedTuple):
    """Deep Feature Factorization of activations ``(B, *spatial, C)`` into ``k`` concepts:
    ``concepts`` ``(C, k)`` (the concept embeddings, in the layer's units), ``heatmaps``
    ``(B, k, *spatial)`` (each concept's weight at every position), ``objective`` (NMF's)."""

    concepts: Array
    heatmaps: Array
    objective: Array


def factorize(activations: Array, components: int, seed: int = 0, max_iterations: int = 200) -> Factorization:
    r"""Deep Feature Factorization of a batch's activations ``(B, *spatial, C)``, jointly over the
    batch (concepts shared by the images):

    .. math:: V = \big[A_c(b, p) - \min_{b,p} A_c\big]_{c,\,(b,p)} \approx W H, \qquad
              \text{concepts} = W + \min A_c, \quad \text{heatmaps}_{b,j}(p) = H_{j,(b,p)}

    (pytorch-grad-cam's ``dff``: channels are shifted to be non-negative, the shift added back to the
    concepts; NaNs become 0). The NMF is :func:`nmf`.

    Reference: Collins, Achanta, Süsstrunk. "Deep Feature Factorization for Concept Discovery", ECCV
    2018 (arXiv:1806.10206).
    """
    batch, *spatial, channels = activations.shape
    matrix = jnp.nan_to_num(activations).reshape(-1, channels).T  # (C, B * positions)
    offset = jnp.min(matrix, axis=1, keepdims=True)
    result = nmf(matrix - offset, components, seed, max_iterations)
    heatmaps = result.coefficients.reshape(components, batch, *spatial)
    return Factorization(result.basis + offset, jnp.moveaxis(heatmaps, 0, 1), result.objective)


@register("dff")
def dff(activations: Array, n_components: int = 4, max_iterations: int = 200) -> Array:
    r"""Deep Feature Factorization of one image as a map: the heatmap of its dominant concept,

    .. math:: M = H_{j^*}, \qquad j^* = \arg\max_j \lVert W_j \rVert_2 \textstyle\sum_p H_{j}(p)

    with :math:`V \approx W H` the NMF of the image's shifted activations (:func:`factorize`, seed 0:
    deterministic and independent of the other images of the batch). Class-agnostic. All ``k``
    concepts of a batch factorized jointly, their heatmaps, the head's scores of each concept and
    the concept figure: :func:`flaxcam.dff.deep_feature_factorization` and
    :func:`flaxcam.viz.factorization_figure`. Returns contributions ``(h, w, 1)``.

    Reference: Collins, Achanta, Süsstrunk. "Deep Feature Factorization for Concept Discovery", ECCV
    2018 (arXiv:1806.10206).
    """
    result = factorize(activations[None], n_components, 0, max_iterations)
    shifted = result.concepts - jnp.min(jnp.nan_to_num(activations).reshape(-1, activations.shape[-1]), axis=0)[:, None]
    heatmaps = result.heatmaps[0]  # (k, h, w)
    strength = jnp.linalg.norm(shifted, axis=0) * jnp.sum(heatmaps, axis=(1, 2))
    return heatmaps[jnp.argmax(strength)][..., None]
