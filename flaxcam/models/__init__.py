"""Reference CNNs (Flax linen, NHWC) and their weights: ResNet-18/34/50, VGG16-GAP and a small CNN.

Every model is called as ``model.apply(variables, x, train=False)`` on NHWC images and returns logits.
Global pooling is a plain function, so the last spatial feature maps are module outputs that CAM
methods can target by name: ``layer4`` (ResNets), ``block5_conv3`` (VGG16), ``conv3`` (SmallCNN).

* :data:`MODELS`, :func:`create_model`, :func:`init_variables`: the model registry.
* :func:`load_torchvision_resnet`: a torchvision ResNet ``state_dict`` to a flax model + variables.
* :func:`save_bundle` / :func:`load_bundle`: model name, kwargs, variables and metadata in one file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcam.models.convert import load_torchvision_resnet
from flaxcam.models.io import load_bundle, save_bundle
from flaxcam.models.resnet import (
    POOLINGS,
    BasicBlock,
    Bottleneck,
    Downsample,
    ResNet,
    ResNetStage,
    global_pool,
    resnet18,
    resnet34,
    resnet50,
)
from flaxcam.models.small import SmallCNN, small_cnn
from flaxcam.models.vgg import VGG, vgg16

__all__ = [
    "MODELS",
    "POOLINGS",
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "ResNet",
    "ResNetStage",
    "SmallCNN",
    "VGG",
    "create_model",
    "global_pool",
    "init_variables",
    "load_bundle",
    "load_torchvision_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "save_bundle",
    "small_cnn",
    "vgg16",
]

#: Model constructors by name; each accepts ``num_classes`` and ``pooling`` keyword arguments.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "small_cnn": small_cnn,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` (a key of :data:`MODELS`) with constructor ``kwargs``."""
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: valid names are {', '.join(sorted(MODELS))}") from None
    return constructor(**kwargs)


def init_variables(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 224, 224, 3), seed: int = 0
) -> dict[str, Any]:
    """Initialize ``model`` (jitted) on zeros of NHWC ``input_shape``.

    Returns the variables dict: ``{"params": ...}`` plus ``"batch_stats"`` for models with BatchNorm.
    """

    @jax.jit
    def _init(rng: jax.Array) -> dict[str, Any]:
        return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)

    return dict(_init(jax.random.key(seed)))
