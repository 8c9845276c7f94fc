"""EfficientNet-Lite0 (Flax linen, NHWC) with the structure of ``efficientnet-lite-pytorch`` 0.1.0.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish and an
unscaled stem and head (Google's ``efficientnet/lite/efficientnet_lite_builder.py``). Lite0 has width and
depth coefficients 1.0 and 224x224 inputs; 4,652,008 parameters with 1000 classes.

Module tree (names mirror the PyTorch ``state_dict`` keys, with the stem and the head wrapped in a
module so that their activated outputs are layers)::

    stem                 _conv_stem (3x3/2, 32) + _bn0 + ReLU6          torch: _conv_stem, _bn0
    _blocks              the 16 MBConv blocks, children "0" .. "15"     torch: _blocks.<i>
    _blocks.<i>          [_expand_conv 1x1 + _bn0 + ReLU6] (absent when expand ratio is 1),
                         _depthwise_conv kxk/s + _bn1 + ReLU6, _project_conv 1x1 + _bn2,
                         identity shortcut when stride 1 and in == out channels
    head                 _conv_head (1x1, 1280) + _bn1 + ReLU6          torch: _conv_head, _bn1
    (global pooling)     a plain function: ``flaxcam.models.resnet.global_pool``
    _fc                  Dense 1280 -> num_classes                      torch: _fc

``head`` (7x7x1280 at 224x224) feeds global pooling and ``_fc`` directly: the CAM target layer, and
the default layer of :func:`flaxcam.explain`.

Stages (expand ratio, kernel, stride of the first block, output channels, blocks), from the block
strings ``r1_k3_s11_e1_i32_o16`` .. ``r1_k3_s11_e6_i192_o320``::

    e1 k3 s1  16 x1 | e6 k3 s2  24 x2 | e6 k5 s2  40 x2 | e6 k3 s2  80 x3
    e6 k5 s1 112 x3 | e6 k5 s2 192 x4 | e6 k3 s1 320 x1

Padding: the PyTorch model pads like TensorFlow's ``"SAME"`` (total ``max((ceil(i/s)-1)*s + k - i, 0)``,
``total // 2`` before and the rest after: asymmetric for stride 2, e.g. (0, 1) for the 3x3/2 stem at
224). It computes that padding once for a 224x224 input (``Conv2dStaticSamePadding``) or per call for
any size (``Conv2dDynamicSamePadding``, ``image_size=None``). Flax's ``padding="SAME"`` is the dynamic
rule, so this model equals the static reference at 224x224 and the dynamic one at every size.

BatchNorm: epsilon 1e-3, TensorFlow momentum 0.99 (torch ``momentum=0.01``, flax ``momentum=0.99``).
Training mode (``train=True``): batch statistics, plus dropout 0.2 before ``_fc`` and drop-connect
(stochastic depth, rate ``0.2 * i / 16`` for block ``i``) when a ``"dropout"`` PRNG stream is given
(``rngs={"dropout": key}``); without one they are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flaxcam.models.convert import _to_numpy, convert_state_dict, strip_module_prefix
from flaxcam.models.layers import PointwiseConv
from flaxcam.models.resnet import check_pooling, global_pool

__all__ = [
    "LITE0_BLOCKS",
    "BlockArgs",
    "Blocks",
    "EfficientNetLite",
    "EfficientNetLite0",
    "Head",
    "MBConvBlock",
    "Stem",
    "efficientnet_lite0",
    "load_efficientnet_lite0",
]

Dtype = Any

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99  # TensorFlow's; torch momentum 1 - 0.99 = 0.01
#: Google's EfficientNet initializers: conv ``variance_scaling(2, fan_out, normal)``, dense uniform.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks: ``num_repeat`` blocks, the first with ``stride`` and channel change."""

    num_repeat: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int


#: EfficientNet-Lite0's stages (``efficientnet_lite`` block strings of ``efficientnet-lite-pytorch``).
LITE0_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)


def _batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype, name=name
    )


def _conv(features: int, kernel: int, strides: int, dtype: Dtype, name: str) -> nn.Module:
    if kernel == 1:
        # "SAME" padding is zero for 1x1 kernels: a matrix product, faster on XLA's CPU backend.
        return PointwiseConv(features, strides=strides, dtype=dtype, kernel_init=_CONV_INIT, name=name)
    # "SAME": TensorFlow's rule (asymmetric for stride 2), the padding the weights were trained with.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        use_bias=False,
        dtype=dtype,
        kernel_init=_CONV_INIT,
        name=name,
    )


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one spatial dimension: output ``ceil(size / stride)``, the total
    padding split with the extra pixel at the end (as ``lax.conv_general_dilated(padding="SAME")``)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_conv_same(x: jax.Array, kernel: jax.Array, stride: int, dilation: int = 1) -> jax.Array:
    r"""Depthwise convolution with "SAME" padding as a sum of ``k*k`` shifted, per-channel scaled copies.

    :math:`y[b, i, j, c] = \sum_{u, v} x_p[b, s i + d u, s j + d v, c] \, K[u, v, 0, c]` with :math:`x_p` the
    input padded for the dilated kernel's extent :math:`d (k - 1) + 1` (dilation ``d``, "atrous"): the same result as ``lax.conv_general_dilated(..., feature_group_count=C)`` (equal up
    to float rounding, tested), but XLA's CPU backend runs grouped convolutions with one group per channel
    through a slow generic path, while this form fuses into one elementwise loop (5-32x faster per layer
    on a 2-core CPU, ``python -m benchmarks.depthwise_conv``). ``x`` is ``(B, H, W, C)``, ``kernel`` ``(k, k, 1, C)``.
    """
    size = kernel.shape[0]
    extent = dilation * (size - 1) + 1
    height, width = x.shape[1], x.shape[2]
    pad_h, pad_w = _same_padding(height, extent, stride), _same_padding(width, extent, stride)
    padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    out_h, out_w = -(-height // stride), -(-width // stride)
    total = None
    for u in range(size):
        for v in range(size):
            du, dv = dilation * u, dilation * v
            window = lax.slice(
                padded,
                (0, du, dv, 0),
                (padded.shape[0], du + stride * (out_h - 1) + 1, dv + stride * (out_w - 1) + 1, padded.shape[3]),
                (1, stride, stride, 1),
            )
            term = window * kernel[u, v, 0, :]
            total = term if total is None else total + term
    if total is None:
        raise ValueError(f"depthwise kernel must be at least 1x1, got shape {kernel.shape}")
    return total


class DepthwiseConv(nn.Module):
    """A ``(k, k)`` depthwise convolution with "SAME" padding and no bias, with ``nn.Conv``'s parameter
    (``kernel`` of shape ``(k, k, 1, C)``), computed by :func:`depthwise_conv_same`."""

    kernel_size: int
    strides: int
    dtype: Dtype = jnp.float32
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the depthwise convolution to NHWC ``x``."""
        channels = x.shape[-1]
        kernel = self.param("kernel", _CONV_INIT, (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
        return depthwise_conv_same(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.dilation)


class Stem(nn.Module):
    """``_conv_stem`` (3x3, stride 2) + ``_bn0`` + ReLU6."""

    features: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the stem to NHWC ``x``."""
        x = _conv(self.features, 3, 2, self.dtype, "_conv_stem")(x)
        return nn.relu6(_batch_norm(train, self.dtype, "_bn0")(x))


class Head(nn.Module):
    """``_conv_head`` (1x1) + ``_bn1`` + ReLU6: the last feature map, fed to global pooling."""

    features: int = 1280
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the head convolution to NHWC ``x``."""
        x = _conv(self.features, 1, 1, self.dtype, "_conv_head")(x)
        return nn.relu6(_batch_norm(train, self.dtype, "_bn1")(x))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite's block).

    ``_expand_conv``/``_bn0`` (1x1 to ``input_filters * expand_ratio``, only when ``expand_ratio != 1``),
    ``_depthwise_conv``/``_bn1`` (``kernel_size``, ``stride``), ``_project_conv``/``_bn2`` (1x1, linear);
    ReLU6 after the first two; identity shortcut when ``stride == 1`` and input and output channels match.
    ``dilation``: the depthwise convolution's dilation (2 in the blocks after an atrous stage's stride).
    """

    input_filters: int
    output_filters: int
    kernel_size: int
    stride: int
    expand_ratio: int
    drop_connect_rate: float = 0.0
    dtype: Dtype = jnp.float32
    dilation: int = 1

    @nn.compact
    def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to NHWC ``inputs``."""
        hidden = self.input_filters * self.expand_ratio
        x = inputs
        if self.expand_ratio != 1:
            x = _conv(hidden, 1, 1, self.dtype, "_expand_conv")(x)
            x = nn.relu6(_batch_norm(train, self.dtype, "_bn0")(x))
        x = DepthwiseConv(self.kernel_size, self.stride, self.dtype, self.dilation, name="_depthwise_conv")(x)
        x = nn.relu6(_batch_norm(train, self.dtype, "_bn1")(x))
        x = _conv(self.output_filters, 1, 1, self.dtype, "_project_conv")(x)
        x = _batch_norm(train, self.dtype, "_bn2")(x)
        if self.stride == 1 and self.input_filters == self.output_filters:
            if train and self.drop_connect_rate > 0 and self.has_rng("dropout"):
                keep = 1.0 - self.drop_connect_rate
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
                x = jnp.where(mask, x / keep, 0).astype(x.dtype)
            x = x + inputs
        return x


def atrous_stage(blocks_args: tuple[BlockArgs, ...]) -> int:
    """Index of the last stage whose first block has stride 2 (the one ``atrous=True`` runs at stride 1)."""
    strided = [i for i, args in enumerate(blocks_args) if args.stride == 2]
    if not strided:
        raise ValueError("atrous=True needs a stage with stride 2; these blocks have none")
    return strided[-1]


class Blocks(nn.Module):
    """The MBConv blocks of every stage in order, as children ``"0"``, ``"1"``, ... (torch's ``_blocks``).

    ``atrous=True``: the last stride-2 stage runs at stride 1 and every later depthwise convolution is
    dilated by 2 (the "atrous" algorithm; same parameters), doubling the output resolution.
    """

    blocks_args: tuple[BlockArgs, ...] = LITE0_BLOCKS
    drop_connect_rate: float = 0.2
    dtype: Dtype = jnp.float32
    atrous: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply every block to NHWC ``x``."""
        total = sum(args.num_repeat for args in self.blocks_args)
        dilated_from = atrous_stage(self.blocks_args) if self.atrous else len(self.blocks_args)
        index = 0
        for stage, args in enumerate(self.blocks_args):
            for repeat in range(args.num_repeat):
                stride = args.stride if repeat == 0 else 1
                # The block that loses its stride keeps dilation 1: its kernel still reads neighbouring
                # input pixels; every spatial kernel after it reads every other pixel of the finer grid.
                after_stride = stage > dilated_from or (stage == dilated_from and repeat > 0)
                x = MBConvBlock(
                    input_filters=args.input_filters if repeat == 0 else args.output_filters,
                    output_filters=args.output_filters,
                    kernel_size=args.kernel_size,
                    stride=1 if stage == dilated_from and repeat == 0 else stride,
                    expand_ratio=args.expand_ratio,
                    drop_connect_rate=self.drop_connect_rate * index / total,
                    dtype=self.dtype,
                    dilation=2 if after_stride else 1,
                    name=str(index),
                )(x, train)
                index += 1
        return x


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite; ``__call__(x, train=False)`` maps NHWC images to logits.

    Attributes:
        num_classes: width of the ``_fc`` classifier.
        pooling: global pooling before ``_fc``, ``"avg"`` (GAP, the pretrained model's) or ``"max"``.
        blocks_args: the stages (default: Lite0's).
        stem_features, head_features: stem and head widths (32 and 1280 in every Lite model).
        dropout_rate: dropout before ``_fc`` in training mode with a ``"dropout"`` PRNG stream.
        drop_connect_rate: stochastic depth rate of the last block (block ``i``: ``rate * i / count``).
        dtype: computation dtype (parameters stay float32).
        atrous: run the last stride-2 stage at stride 1 with the later depthwise convolutions dilated by 2
            (same parameters): output stride 16 instead of 32, 14x14 maps at 224x224. The à trous
            identity holds: the atrous ``head`` output at odd rows and columns, ``[:, 1::2, 1::2]``, equals
            the standard model's (TensorFlow "SAME" padding centres a stride-2 output on input ``2i + 1``).
    """

    num_classes: int = 1000
    pooling: str = "avg"
    blocks_args: tuple[BlockArgs, ...] = LITE0_BLOCKS
    stem_features: int = 32
    head_features: int = 1280
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    dtype: Dtype = jnp.float32
    atrous: bool = False

    def __post_init__(self) -> None:
        """Validate ``pooling`` as soon as the model is constructed."""
        check_pooling(self.pooling)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Return the logits ``(N, num_classes)`` of NHWC images ``x`` (ImageNet-normalized RGB).

        ``train=True`` normalizes with batch statistics and updates ``batch_stats`` (pass
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages (eval mode).
        """
        x = jnp.asarray(x, self.dtype)
        x = Stem(self.stem_features, self.dtype, name="stem")(x, train)
        x = Blocks(self.blocks_args, self.drop_connect_rate, self.dtype, self.atrous, name="_blocks")(x, train)
        x = Head(self.head_features, self.dtype, name="head")(x, train)
        x = global_pool(x, self.pooling)
        if train and self.dropout_rate > 0 and self.has_rng("dropout"):
            x = nn.Dropout(self.dropout_rate, deterministic=False)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_DENSE_INIT, name="_fc")(x)


EfficientNetLite0 = EfficientNetLite


def efficientnet_lite0(num_classes: int = 1000, pooling: str = "avg", dtype: Dtype = jnp.float32) -> EfficientNetLite:
    """EfficientNet-Lite0 (``efficientnet-lite-pytorch`` structure); 224x224 ImageNet-normalized inputs."""
    return EfficientNetLite(num_classes=num_classes, pooling=pooling, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Conversion of the PyTorch state_dict
# ---------------------------------------------------------------------------------------------------

#: Top-level torch modules that live inside a wrapper module here.
_TORCH_PREFIX_TO_FLAX = {
    "_conv_stem": ("stem", "_conv_stem"),
    "_bn0": ("stem", "_bn0"),
    "_conv_head": ("head", "_conv_head"),
    "_bn1": ("head", "_bn1"),
}


def _flax_module_path(torch_path: tuple[str, ...]) -> tuple[str, ...]:
    if torch_path and torch_path[0] in _TORCH_PREFIX_TO_FLAX and len(torch_path) == 1:
        return _TORCH_PREFIX_TO_FLAX[torch_path[0]]
    return tuple(torch_path)


def _torch_module_path(flax_path: tuple[str, ...]) -> tuple[str, ...]:
    if len(flax_path) == 2 and flax_path[0] in ("stem", "head"):
        return flax_path[1:]
    return flax_path


def load_efficientnet_lite0(
    state_dict: Mapping[str, Any], *, pooling: str = "avg", dtype: Any = jnp.float32
) -> tuple[EfficientNetLite, dict[str, Any]]:
    """Build :func:`efficientnet_lite0` and convert a PyTorch EfficientNet-Lite0 ``state_dict`` to it.

    Conv weights OIHW -> HWIO (depthwise ``(C, 1, k, k)`` -> ``(k, k, 1, C)``, flax's
    ``feature_group_count`` layout), BatchNorm ``weight/bias/running_mean/running_var`` ->
    ``scale/bias`` (params) and ``mean/var`` (batch_stats), ``_fc.weight`` transposed;
    ``num_batches_tracked`` is ignored and a ``"module."`` prefix on every key is stripped.
    ``num_classes`` is read from ``_fc.weight``.

    Args:
        state_dict: values are numpy arrays (e.g. from :func:`flaxcam.models.torch_checkpoint.
            load_torch_state_dict`) or torch tensors; torch is never imported here.
        pooling: the flax model's global pooling, ``"avg"`` (the reference's) or ``"max"``.
        dtype: the flax model's computation dtype (the parameters are float32).

    Returns:
        ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``.

    Raises:
        ValueError: naming every missing key, unexpected key and key whose shape does not match.
    """
    check_pooling(pooling)
    state_dict = strip_module_prefix(state_dict)
    if "_fc.weight" not in state_dict:
        raise ValueError(
            "missing key '_fc.weight' in the EfficientNet-Lite0 state_dict (needed to infer num_classes); "
            f"found {len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:5]) or 'none'}"
        )
    fc_weight = _to_numpy(state_dict["_fc.weight"])
    if fc_weight.ndim != 2:
        raise ValueError(f"shape mismatch for '_fc.weight': expected (num_classes, 1280), got {fc_weight.shape}")
    model = efficientnet_lite0(num_classes=int(fc_weight.shape[0]), pooling=pooling, dtype=dtype)

    variables = convert_state_dict(
        state_dict,
        model,
        "EfficientNet-Lite0",
        to_flax=_flax_module_path,
        to_torch=_torch_module_path,
        input_shape=(1, 32, 32, 3),
    )
    return model, variables
