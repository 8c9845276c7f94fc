"""Guided backpropagation and Guided Grad-CAM as signed, input-resolution, per-channel images.

:func:`guided_gradients` is pytorch-grad-cam's ``GuidedBackpropReLUModel`` for a batch: the gradient of
each target score w.r.t. the input with every ReLU backpropagating as a guided ReLU
(:mod:`flaxcam.methods.guided`); :func:`guided_gradcam` multiplies it by the upsampled Grad-CAM map
(Selvaraju et al.). Show either with :func:`flaxcam.viz.deprocess_gradients`. (The registered method
``"guided_backprop"`` gives a ``[0, 1]`` map, the largest absolute guided gradient over channels.)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flaxcam.methods.guided import GuidedModel
from flaxcam.pipeline import explain
from flaxcam.probe import OutputFn, default_output_fn, input_and_layer_gradients
from flaxcam.targets import TargetSpec, resolve_targets, target_scores

Array = jax.Array


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _guided_gradients(model, variables, images, data, spec: TargetSpec, apply_kwargs: tuple, output_fn: OutputFn):
    _, _, chosen, gradients, _ = input_and_layer_gradients(
        GuidedModel(model),
        variables,
        images,
        (),
        lambda out: target_scores(spec, out, data),
        apply_kwargs=apply_kwargs,
        output_fn=output_fn,
    )
    return gradients, chosen


def guided_gradients(
    model: Any,
    variables: Mapping[str, Any],
    images: Any,
    *,
    targets: int | Sequence[int] | np.ndarray | None = None,
    top_k: int | None = None,
    score: str = "logit",
    apply_kwargs: Mapping[str, Any] | None = None,
    output_fn: OutputFn | None = None,
) -> tuple[Array, Array]:
    r"""Guided backpropagation: ``(gradients (B, T, H, W, C), targets (B, T))``, the gradient of each
    target score w.r.t. the input with every ReLU's derivative replaced by
    :math:`[x > 0][g > 0]\,g` (:func:`flaxcam.methods.guided.guided_relu`); targets as in
    :func:`flaxcam.explain`. One jitted forward and backward pass per target.

    Reference: Springenberg et al. "Striving for Simplicity: The All Convolutional Net", 2015
    (arXiv:1412.6806); pytorch-grad-cam's ``GuidedBackpropReLUModel``.
    """
    images = jax.numpy.asarray(images)
    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    output_fn = output_fn or default_output_fn
    shape = jax.eval_shape(lambda v, x: output_fn(model.apply(v, x, **dict(kwargs))), variables, images).shape
    spec, data = resolve_targets(targets, top_k, images.shape[0], tuple(shape), score)
    return _guided_gradients(model, variables, images, data, spec, kwargs, output_fn)


def guided_gradcam(
    model: Any,
    variables: Mapping[str, Any],
    images: Any,
    *,
    layer: str | None = None,
    targets: int | Sequence[int] | np.ndarray | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    output_fn: OutputFn | None = None,
) -> Array:
    r"""Guided Grad-CAM ``(B, T, H, W, C)``: the guided gradient times the Grad-CAM map upsampled to
    the input, :math:`G \odot U(M_{\mathrm{Grad\text{-}CAM}})` (Selvaraju et al., section 3.1;
    pytorch-grad-cam's example ``cam_mask * gb``). The Grad-CAM map uses the model's ordinary
    gradients; both explain the same targets (each image's top class by default).

    Reference: Selvaraju et al. "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017 (arXiv:1610.02391).
    """
    explanation = explain(
        model,
        variables,
        images,
        method="gradcam",
        layer=layer,
        targets=targets,
        apply_kwargs=apply_kwargs,
        output_fn=output_fn,
    )
    gradients, _ = guided_gradients(
        model,
        variables,
        images,
        targets=np.asarray(explanation.targets),
        apply_kwargs=apply_kwargs,
        output_fn=output_fn,
    )
    return explanation.maps[..., None] * gradients
