r"""ADCC and pytorch-grad-cam's ARCC: coherency, complexity and a confidence term, combined by their
harmonic mean (Poppi, Cornia, Baraldi, Cucchiara, "Revisiting The Evaluation of Class Activation Mapping
for Explainability: A Novel Metric and Experimental Analysis", CVPR Workshops 2021, arXiv:2104.10252).

* :func:`complexity` — :math:`\frac{1}{HW}\sum |M|` (L1 norm per pixel; lower is better).
* :func:`coherency` — :math:`\big(\rho(M, M') + 1\big) / 2` with :math:`M'` the map of the same
  method for :math:`x \odot M` and :math:`\rho` Pearson's correlation with sample standard deviations
  and ``1e-8`` added to their product (pytorch-grad-cam's ``batch_pearson_coherency``; higher is better).
* :func:`adcc` — :math:`3\,\big(\frac{1}{\mathrm{Coh}} + \frac{1}{1 - \mathrm{Com}} +
  \frac{1}{1 - \mathrm{AD}}\big)^{-1}` with AD the relative Average Drop (:func:`average_drop`,
  softmax score), the paper's metric.
* :func:`arcc` — pytorch-grad-cam 1.5.7 ``ARCC`` (``metrics/arcc.py``): the same harmonic mean with the
  confidence term replaced by ``clip(2 · ROADCombined, 0, 1)`` over the percentiles 20, 40, 60, 80, and
  ``1e-8`` added to each of the three terms.

Coherency needs the method itself: ``explain_fn(images, targets) -> maps (B, H, W)`` (see
:func:`flaxcam.evaluation.explainer`), called on the masked images between two jitted programs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxcam.evaluation.common import ApplyFn, Array, check_inputs
from flaxcam.evaluation.perturbation import average_drop
from flaxcam.evaluation.road import road_combined

ExplainFn = Callable[[Array, Array], Array]
ARCC_PERCENTILES = (20, 40, 60, 80)


@jax.jit
def _complexity(maps: Array) -> Array:
    return jnp.abs(maps.reshape(maps.shape[0], -1)).mean(axis=1)


def complexity(maps) -> Array:
    r"""L1 norm of each map per pixel, ``(B,)``: :math:`\frac{1}{HW}\sum_{ij} |M_{ij}|` (Poppi et al. 2021;
    pytorch-grad-cam's ``Complexity``). 0 for an empty map, 1 for a map of ones. Lower is better."""
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, H, W), got {maps.shape}")
    return _complexity(maps)


@jax.jit
def pearson_coherency(a: Array, b: Array) -> Array:
    r"""``(ρ + 1) / 2`` per pair of maps ``(B, H, W)``, with
    :math:`\rho = \frac{\mathrm{cov}(a, b)}{s_a s_b + 10^{-8}}` (sample moments, ``n - 1``), as
    pytorch-grad-cam's ``batch_pearson_coherency`` followed by its rescaling to [0, 1]. A constant map
    gives ``ρ = 0``, i.e. 0.5."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    n = a.shape[1]
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    covariance = (a * b).sum(axis=1) / (n - 1)
    scale = jnp.sqrt((a * a).sum(axis=1) / (n - 1)) * jnp.sqrt((b * b).sum(axis=1) / (n - 1))
    return (covariance / (scale + 1e-8) + 1) / 2


@jax.jit
def _masked(images: Array, maps: Array) -> Array:
    return images * maps[..., None]


def coherency(explain_fn: ExplainFn, images, maps, targets) -> Array:
    r"""Coherency of each map with the map of its own masked image, ``(B,)`` in [0, 1]:

    .. math:: \mathrm{Coh}(x) = \frac{\rho\big(M(x \odot M(x)),\ M(x)\big) + 1}{2}

    (Poppi et al. 2021; pytorch-grad-cam's ``Coherency``). ``explain_fn(images, targets)`` must return
    the method's ``(B, H, W)`` maps for the targets. Higher is better.
    """
    images, maps, targets = check_inputs(images, maps, targets)
    again = jnp.asarray(explain_fn(_masked(images, maps), targets))
    if again.shape != maps.shape:
        raise ValueError(f"explain_fn must return maps of shape {maps.shape}, got {again.shape}")
    return pearson_coherency(again.astype(maps.dtype), maps)


@jax.jit
def harmonic_mean3(a: Array, b: Array, c: Array, eps: float = 0.0) -> Array:
    """``3 / (1/(a + eps) + 1/(b + eps) + 1/(c + eps))``, elementwise."""
    return 3 / (1 / (a + eps) + 1 / (b + eps) + 1 / (c + eps))


def adcc(
    explain_fn: ExplainFn, apply_fn: ApplyFn, variables: Any, images, maps, targets, score: str = "softmax"
) -> dict[str, Array]:
    r"""ADCC (Poppi et al. 2021), ``(B,)`` each: ``{"adcc", "coherency", "complexity", "average_drop"}``,

    .. math:: \mathrm{ADCC}(x) = 3\Big(\frac{1}{\mathrm{Coh}(x)} + \frac{1}{1 - \mathrm{Com}(x)}
              + \frac{1}{1 - \mathrm{AD}(x)}\Big)^{-1}

    Higher is better. NaN where Average Drop is (a target score ≤ 0, see :func:`average_drop`).
    """
    coherence = coherency(explain_fn, images, maps, targets)
    spread = complexity(maps)
    drop = average_drop(apply_fn, variables, images, maps, targets, score=score)
    return {
        "adcc": harmonic_mean3(coherence, 1 - spread, 1 - drop),
        "coherency": coherence,
        "complexity": spread,
        "average_drop": drop,
    }


def arcc(
    explain_fn: ExplainFn,
    apply_fn: ApplyFn,
    variables: Any,
    images,
    maps,
    targets,
    percentiles=ARCC_PERCENTILES,
    **road_options,
) -> dict[str, Array]:
    r"""pytorch-grad-cam 1.5.7's ``ARCC``, ``(B,)`` each: ``{"arcc", "coherency", "complexity", "road"}``,

    .. math:: \mathrm{ARCC}(x) = 3\Big(\frac{1}{\mathrm{Coh} + \epsilon} + \frac{1}{1 - \mathrm{Com} + \epsilon}
              + \frac{1}{\mathrm{clip}(2\,\mathrm{ROAD}, 0, 1) + \epsilon}\Big)^{-1}, \quad \epsilon = 10^{-8}

    with ROAD = :func:`road_combined` at ``percentiles`` (``road_options`` go to :func:`road`). Higher is
    better.
    """
    coherence = coherency(explain_fn, images, maps, targets)
    spread = complexity(maps)
    combined = road_combined(apply_fn, variables, images, maps, targets, percentiles=percentiles, **road_options)
    scaled = jnp.clip(combined * 2, 0, 1)
    return {
        "arcc": harmonic_mean3(coherence, 1 - spread, scaled, 1e-8),
        "coherency": coherence,
        "complexity": spread,
        "road": combined,
    }
