"""NNX twins of :mod:`flaxcam.models.resnet`: the same modules under the same names, so the linen
variables load one to one (:func:`load_linen_variables`) and layer names are the same
(``layer4``, ``layer3.1``, ``layer3.1.conv2``, ``layer1.0.downsample.0``).

``resnet18_nnx(variables=...)`` builds the model and loads linen variables (e.g. from
:func:`flaxcam.models.convert` of a torchvision checkpoint); the model is returned in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxcam.models.layers import pointwise_conv
from flaxcam.models.resnet import check_pooling, global_pool

Dtype = Any


class PointwiseConv(nnx.Module):
    """A 1x1 convolution as a matrix product (:func:`flaxcam.models.layers.pointwise_conv`), with
    ``nnx.Conv``'s ``kernel`` ``(1, 1, C, D)`` and optional ``bias``."""

    def __init__(
        self, in_features: int, out_features: int, strides: int = 1, use_bias: bool = False, *, rngs: nnx.Rngs
    ):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (1, 1, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.strides = strides

    def __call__(self, x: jax.Array) -> jax.Array:
        y = pointwise_conv(x, self.kernel[...], self.strides)
        return y if self.bias is None else y + self.bias[...]


def _conv(cin: int, cout: int, kernel: int, strides: int, padding: int, rngs: nnx.Rngs) -> nnx.Module:
    if kernel == 1 and padding == 0:
        return PointwiseConv(cin, cout, strides, rngs=rngs)
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        rngs=rngs,
    )


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
    """torchvision's ``BasicBlock``: ``conv1``/``bn1``, ``conv2``/``bn2`` and a shortcut."""

    expansion = 1

    def __init__(self, cin: int, features: int, strides: int, *, rngs: nnx.Rngs):
        out = features * self.expansion
        self.conv1 = _conv(cin, features, 3, strides, 1, rngs)
        self.bn1 = _batch_norm(features, rngs)
        self.conv2 = _conv(features, features, 3, 1, 1, rngs)
        self.bn2 = _batch_norm(features, rngs)
        self.downsample = _downsample(cin, out, strides, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + _shortcut(x, self.downsample))


class Bottleneck(nnx.Module):
    """torchvision's ``Bottleneck`` (v1.5, stride on ``conv2``)."""

    expansion = 4

    def __init__(self, cin: int, features: int, strides: int, *, rngs: nnx.Rngs):
        out = features * self.expansion
        self.conv1 = _conv(cin, features, 1, 1, 0, rngs)
        self.bn1 = _batch_norm(features, rngs)
        self.conv2 = _conv(features, features, 3, strides, 1, rngs)
        self.bn2 = _batch_norm(features, rngs)
        self.conv3 = _conv(features, out, 1, 1, 0, rngs)
        self.bn3 = _batch_norm(out, rngs)
        self.downsample = _downsample(cin, out, strides, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + _shortcut(x, self.downsample))


def _downsample(cin: int, out: int, strides: int, rngs: nnx.Rngs) -> nnx.List | None:
    """The projection shortcut as items ``0`` (1x1 conv) and ``1`` (BatchNorm), torchvision's names."""
    if strides == 1 and cin == out:
        return None
    return nnx.List([_conv(cin, out, 1, strides, 0, rngs), _batch_norm(out, rngs)])


def _shortcut(x: jax.Array, downsample: nnx.List | None) -> jax.Array:
    return x if downsample is None else downsample[1](downsample[0](x))


class Stage(nnx.List):
    """One stage (``layer1`` .. ``layer4``): its blocks as items ``0``, ``1``, ... called in order (a
    callable list, so the stage itself is a layer, as in the linen model)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self:
            x = block(x)
        return x


class ResNet(nnx.Module):
    """A torchvision-structured ResNet (NNX): ``model(x)`` maps NHWC images to logits."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        block_cls: type[BasicBlock] | type[Bottleneck],
        num_classes: int = 1000,
        pooling: str = "avg",
        *,
        rngs: nnx.Rngs,
    ):
        self.pooling = check_pooling(pooling)
        self.conv1 = _conv(3, 64, 7, 2, 3, rngs)
        self.bn1 = _batch_norm(64, rngs)
        cin = 64
        for i, num_blocks in enumerate(stage_sizes):
            blocks = []
            for j in range(num_blocks):
                blocks.append(block_cls(cin, 64 * 2**i, (1 if i == 0 else 2) if j == 0 else 1, rngs=rngs))
                cin = 64 * 2**i * block_cls.expansion
            setattr(self, f"layer{i + 1}", Stage(blocks))
        self.num_stages = len(stage_sizes)
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(global_pool(x, self.pooling))


_STAGES: dict[str, tuple[tuple[int, ...], type[BasicBlock] | type[Bottleneck]]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
}


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Copy linen ``variables`` (``params`` and ``batch_stats``) into the NNX twin ``model`` in place,
    path by path (``layer1/0/conv1/kernel`` → ``model.layer1[0].conv1.kernel``; a BatchNorm's
    ``mean`` / ``var`` from ``batch_stats``). A missing path or a shape mismatch is an error."""
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
        for path, value in flat:
            node: Any = model
            names = [key.key for key in path]
            for name in names[:-1]:
                node = node[int(name)] if name.isdigit() else getattr(node, name)
            target = getattr(node, names[-1], None)
            if target is None or tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{collection}/{'/'.join(names)} {tuple(value.shape)} has no match in the NNX model")
            target[...] = jnp.asarray(value)
    return model


def _build(name: str, variables: Mapping[str, Any] | None, num_classes: int, pooling: str, seed: int) -> ResNet:
    stages, block = _STAGES[name]
    model = ResNet(stages, block, num_classes, pooling, rngs=nnx.Rngs(seed))
    if variables is not None:
        load_linen_variables(model, variables)
    model.eval()
    return model


def resnet18_nnx(
    variables: Mapping[str, Any] | None = None, num_classes: int = 1000, pooling: str = "avg", seed: int = 0
) -> ResNet:
    """ResNet-18 (NNX), with ``variables`` of :func:`flaxcam.models.resnet18` loaded when given."""
    return _build("resnet18", variables, num_classes, pooling, seed)


def resnet34_nnx(
    variables: Mapping[str, Any] | None = None, num_classes: int = 1000, pooling: str = "avg", seed: int = 0
) -> ResNet:
    """ResNet-34 (NNX), with ``variables`` of :func:`flaxcam.models.resnet34` loaded when given."""
    return _build("resnet34", variables, num_classes, pooling, seed)


def resnet50_nnx(
    variables: Mapping[str, Any] | None = None, num_classes: int = 1000, pooling: str = "avg", seed: int = 0
) -> ResNet:
    """ResNet-50 (NNX), with ``variables`` of :func:`flaxcam.models.resnet50` loaded when given."""
    return _build("resnet50", variables, num_classes, pooling, seed)
