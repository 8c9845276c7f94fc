"""Deep Feature Factorization of a batch at a layer: concepts, their heatmaps, the head's scores."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam import ops
from flaxcam.methods.dff import factorize
from flaxcam.probe import forward_at_layer, list_layers, resolve_layer

Array = jax.Array


class Concepts(NamedTuple):
    """The result of :func:`deep_feature_factorization` for ``B`` images and ``k`` concepts.

    Attributes:
      concepts: ``(C, k)`` concept embeddings in the layer's feature space.
      heatmaps: ``(B, k, H, W)`` each concept's heatmap, min-max normalized per map at the layer's
        resolution and resized to the input (pytorch-grad-cam's ``scale_cam_image``).
      low_res: ``(B, k, h, w)`` the NMF coefficients as they are.
      scores: ``(k, K)`` the head's outputs for each concept embedding (``head=``), else None.
      objective: the NMF objective :math:`\\tfrac12 \\lVert V - WH \\rVert_F^2`.
    """

    concepts: Array
    heatmaps: Array
    low_res: Array
    scores: Array | None
    objective: Array


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _factorize_at(
    model, variables, images, layer: str, components: int, max_iterations: int, apply_kwargs: tuple, seed: int
):
    _, activations, _ = forward_at_layer(model, variables, images, layer, None, apply_kwargs)
    result = factorize(activations, components, seed, max_iterations)
    heatmaps = ops.resize_maps(ops.minmax_normalize(result.heatmaps), images.shape[1:3])
    return result.concepts, heatmaps, result.heatmaps, result.objective


def deep_feature_factorization(
    model: Any,
    variables: Mapping[str, Any],
    images: Any,
    *,
    layer: str | None = None,
    n_components: int = 5,
    max_iterations: int = 200,
    seed: int = 0,
    head: str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Concepts:
    r"""Deep Feature Factorization (Collins et al. 2018): the activations of ``layer`` for the whole
    batch, shifted per channel to be non-negative, factorized by NMF into ``n_components`` concepts
    shared by the images (:func:`flaxcam.methods.dff.factorize`: scikit-learn's coordinate-descent NMF
    on device, deterministic from ``seed``; ``seed=0`` is pytorch-grad-cam's initialization). With ``head`` (a Dense layer's name, e.g. ``"fc"``), each concept
    embedding is scored by it, :math:`W_j^\top K + b` (pytorch-grad-cam's ``computation_on_concepts``).
    Show the result with :func:`flaxcam.viz.factorization_figure`.

    Reference: Collins, Achanta, Süsstrunk. "Deep Feature Factorization for Concept Discovery", ECCV
    2018 (arXiv:1806.10206); pytorch-grad-cam's ``DeepFeatureFactorization``.
    """
    images = jnp.asarray(images)
    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    info = resolve_layer(list_layers(model, variables, images, kwargs), layer)
    channels, positions = info.shape[-1], int(np.prod(info.shape[:-1]))
    if not isinstance(n_components, int) or not 1 <= n_components <= min(channels, positions):
        raise ValueError(
            f"n_components must be an int between 1 and min(channels, batch positions) = "
            f"{min(channels, positions)} at layer {info.name!r} of shape {info.shape}; got {n_components!r}"
        )
    concepts, heatmaps, low_res, objective = _factorize_at(
        model, variables, images, info.name, n_components, max_iterations, kwargs, seed
    )
    scores = None
    if head is not None:
        params = variables["params"]
        for part in head.split("."):
            params = params[part]
        scores = concepts.T @ params["kernel"] + params.get("bias", 0.0)
    return Concepts(concepts, heatmaps, low_res, scores, objective)
