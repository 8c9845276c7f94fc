r"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods", ICML 2022, arXiv:2202.00449), as pytorch-grad-cam 1.5.7
implements it (``pytorch_grad_cam.metrics.road``).

The pixels selected by a percentile of the map are *removed* and filled by the noisy linear imputation
— each removed pixel becomes the weighted mean of its 8 neighbours (weights 1/6 for the 4 direct ones,
1/12 for the diagonals, renormalized at the image border), the known pixels fixed:

.. math:: \sigma_i\, x_i - \sum_{j \in \mathcal N(i),\, j \text{ removed}} w_{ij}\, x_j
          = \sum_{j \in \mathcal N(i),\, j \text{ kept}} w_{ij}\, v_j,
          \qquad \sigma_i = \sum_{j \in \mathcal N(i)} w_{ij}

per channel, then Gaussian noise of standard deviation ``noise`` (0.01) is added to the imputed
pixels. pytorch-grad-cam builds this sparse system per image on the host and calls SciPy's
``spsolve``; here it is solved **on device** for the whole batch by the preconditioned conjugate
gradient (the system is symmetric positive definite whenever every removed region touches a kept
pixel; the Jacobi preconditioner is ``1 / σ``), inside the same compiled program as the forward passes.

Removal rule (pytorch-grad-cam's, kept for parity): at percentile ``p``, with ``t = percentile(M, p)``
(linear interpolation, NumPy's default), *most relevant first* (MoRF) keeps the pixels with ``M < t``
and removes the others (the top ``100 - p`` %); *least relevant first* (LeRF) applies the same rule to
``1 - M`` (removes the bottom ``100 - p`` %). Ties at ``t`` are removed.

Ill-defined case: when no pixel is kept (a constant map, or more than ``p`` % of the pixels tied at
the map's minimum — common for ReLU'd CAMs at small ``p``), the system has no boundary values and is
singular; SciPy's ``spsolve`` then returns NaN (pytorch-grad-cam's score becomes NaN). Here the
conjugate gradient starts from and stays at 0, so every pixel becomes 0 (+ noise) — in normalized input
space the dataset mean — and the score stays finite. Tested in ``tests/test_evaluation.py``.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import jax
import jax.numpy as jnp

from flaxcam.errors import check_image_ids
from flaxcam.evaluation.common import (
    ApplyFn,
    Array,
    check_inputs,
    check_percentiles,
    check_positive,
    check_score,
    target_scores,
)
from flaxcam.ops import chunked_map
from flaxcam.step import per_image_keys

#: pytorch-grad-cam's percentiles for the averaged and combined ROAD scores.
DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ORDERS = ("morf", "lerf")

#: The imputation's neighbour weights, ``(dy, dx) -> w`` (pytorch-grad-cam's ``neighbors_weights``).
NEIGHBOUR_WEIGHTS = {
    (1, 1): 1 / 12,
    (0, 1): 1 / 6,
    (-1, 1): 1 / 12,
    (1, -1): 1 / 12,
    (0, -1): 1 / 6,
    (-1, -1): 1 / 12,
    (1, 0): 1 / 6,
    (-1, 0): 1 / 6,
}


def _neighbour_sum(values: Array) -> Array:
    """``Σ_j w_ij values_j`` over the 8 neighbours of each pixel of ``(H, W, ...)``, zero outside."""
    height, width = values.shape[:2]
    padded = jnp.pad(values, ((1, 1), (1, 1)) + ((0, 0),) * (values.ndim - 2))
    return cast(
        Array,
        sum(
            weight * padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            for (dy, dx), weight in NEIGHBOUR_WEIGHTS.items()
        ),
    )


def linear_imputation(image: Array, removed: Array, tol: float | None = None, maxiter: int | None = None) -> Array:
    r"""Noise-free linear imputation of the ``removed`` pixels ``(H, W)`` bool of ``image`` ``(H, W, C)``:
    the solution of the module's system by Jacobi-preconditioned conjugate gradient
    (:func:`jax.scipy.sparse.linalg.cg`), kept pixels unchanged. ``tol``: relative residual (default
    1e-6 in float32, 1e-10 in float64); ``maxiter`` default ``4 (H + W)`` (enough for the longest removed
    region; measured against SciPy's direct solve in the tests).

    The operator acts on the whole grid: on removed pixels :math:`\sigma_i x_i - \sum_j w_{ij} u_j x_j`,
    on kept pixels the identity (their unknowns are 0), which keeps it symmetric positive definite.
    """
    height, width = removed.shape
    unknown = removed[..., None].astype(image.dtype)
    sigma = _neighbour_sum(jnp.ones((height, width, 1), image.dtype))
    if tol is None:
        tol = 1e-10 if image.dtype == jnp.float64 else 1e-6
    if maxiter is None:
        maxiter = 4 * (height + width)

    def operator(x: Array) -> Array:
        return unknown * (sigma * x - _neighbour_sum(unknown * x)) + (1 - unknown) * x

    def preconditioner(x: Array) -> Array:
        return jnp.where(unknown > 0, x / sigma, x)

    rhs = unknown * _neighbour_sum((1 - unknown) * image)
    solution, _ = jax.scipy.sparse.linalg.cg(operator, rhs, tol=tol, atol=0.0, maxiter=maxiter, M=preconditioner)
    return jnp.where(unknown > 0, solution, image)


def removal_mask(cam: Array, percentile: Array, order: str) -> Array:
    """``(H, W)`` bool, the pixels ROAD removes from one map at ``percentile`` (module docstring)."""
    values = cam if order == "morf" else 1 - cam
    return values >= jnp.percentile(values, percentile)


@functools.partial(jax.jit, static_argnames=("apply_fn", "score", "orders", "chunk_size", "maxiter"))
def road_impl(
    apply_fn: ApplyFn,
    variables: Any,
    images: Array,
    maps: Array,
    targets: Array,
    percentiles: Array,
    key: Array,
    noise: float,
    score: str,
    orders: tuple[str, ...],
    chunk_size: int,
    tol: float | None = None,
    maxiter: int | None = None,
    image_ids: Array | None = None,
) -> Array:
    """Jitted body of :func:`road`: ``(len(orders), len(percentiles), B)`` score changes."""
    batch = images.shape[0]
    count = len(orders) * percentiles.shape[0]
    original = target_scores(apply_fn, variables, images, targets, score)
    # (count, B): job j of image b draws from fold_in(fold_in(key, j), image_ids[b]), the explainer's
    # per-image convention, so an image's noise follows its id, not its place in the batch
    keys = jnp.stack([per_image_keys(key, job, image_ids, batch) for job in range(count)])

    def score_rows(index: Array) -> Array:
        job, image_index = index // batch, index % batch
        percentile = percentiles[job % percentiles.shape[0]]  # (n,)
        masks = [
            jax.vmap(functools.partial(removal_mask, order=order))(maps[image_index], percentile) for order in orders
        ]
        removed = (
            masks[0]
            if len(orders) == 1
            else cast(Array, jnp.where((job // percentiles.shape[0] == 0)[:, None, None], *masks))
        )
        imputed = jax.vmap(lambda im, rm: linear_imputation(im, rm, tol, maxiter))(images[image_index], removed)
        draws = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], images.dtype))(keys[job, image_index])
        imputed = imputed + noise * removed[..., None] * draws
        return target_scores(apply_fn, variables, imputed, targets[image_index], score)[:, None]

    scores = chunked_map(score_rows, count * batch, chunk_size).reshape(len(orders), percentiles.shape[0], batch)
    return scores - original


def road(
    apply_fn: ApplyFn,
    variables: Any,
    images,
    maps,
    targets,
    *,
    percentiles=DEFAULT_PERCENTILES,
    orders: str | tuple[str, ...] = ORDERS,
    noise: float = 0.01,
    key: Array | None = None,
    score: str = "logit",
    chunk_size: int = 16,
    tol: float | None = None,
    maxiter: int | None = None,
    image_ids=None,
) -> dict[str, Array]:
    r"""ROAD score changes at each percentile: ``{"morf": (P, B), "lerf": (P, B)}`` (those in ``orders``),

    .. math:: \Delta_p(x) = s_c\big(\mathrm{impute}(x, R_p)\big) - s_c(x)

    with :math:`R_p` the removed pixels (module docstring). pytorch-grad-cam's ``ROADMostRelevantFirst
    (percentile=p)`` and ``ROADLeastRelevantFirst(percentile=p)`` are the rows; their averages over the
    percentiles are :func:`road_average`, and :func:`road_combined` is ``(LeRF - MoRF) / 2``. One compiled
    program for all orders, percentiles and images, ``chunk_size`` imputed images per forward pass.
    ``key`` draws the imputation noise (default ``jax.random.key(0)``; ``noise=0`` for none), per image
    from ``image_ids`` ``(B,)`` (e.g. dataset indices; default: positions in the batch), so an image gets
    the same noise in any batch (:func:`flaxcam.step.per_image_keys`).
    """
    check_score(score)
    check_positive("chunk_size", chunk_size)
    orders = (orders,) if isinstance(orders, str) else tuple(orders)
    unknown = [o for o in orders if o not in ORDERS] or ([] if orders else ["(none)"])
    if unknown:
        raise ValueError(f"unknown ROAD order(s) {unknown}; valid: {', '.join(ORDERS)}")
    values = check_percentiles(percentiles)
    images, maps, targets = check_inputs(images, maps, targets)
    key = jax.random.key(0) if key is None else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    changes = road_impl(
        apply_fn,
        variables,
        images,
        maps,
        targets,
        jnp.asarray(values, images.dtype),
        key,
        noise,
        score,
        orders,
        int(chunk_size),
        tol,
        maxiter,
        None if image_ids is None else check_image_ids(image_ids, images.shape[0]),
    )
    return {order: changes[i] for i, order in enumerate(orders)}


def road_average(
    apply_fn: ApplyFn,
    variables: Any,
    images,
    maps,
    targets,
    order: str = "morf",
    percentiles=DEFAULT_PERCENTILES,
    **options,
) -> Array:
    """Mean over the percentiles of :func:`road`'s score change, ``(B,)``: pytorch-grad-cam's
    ``ROADMostRelevantFirstAverage`` (``order="morf"``, lower is better) and
    ``ROADLeastRelevantFirstAverage`` (``"lerf"``, higher is better)."""
    return road(apply_fn, variables, images, maps, targets, percentiles=percentiles, orders=(order,), **options)[
        order
    ].mean(axis=0)


def road_combined(
    apply_fn: ApplyFn, variables: Any, images, maps, targets, percentiles=DEFAULT_PERCENTILES, **options
) -> Array:
    r"""pytorch-grad-cam's ``ROADCombined``, ``(B,)``: :math:`\big(\overline{\Delta}_{LeRF} -
    \overline{\Delta}_{MoRF}\big) / 2` over the percentiles. Higher is better."""
    changes = road(apply_fn, variables, images, maps, targets, percentiles=percentiles, orders=ORDERS, **options)
    return (changes["lerf"].mean(axis=0) - changes["morf"].mean(axis=0)) / 2
