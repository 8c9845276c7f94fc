"""Import torchvision ResNet weights into the flax ResNets of :mod:`flaxcam.models.resnet`.

flaxcam never imports torch: ``state_dict`` values may be numpy arrays or any object with
``.detach().cpu().numpy()`` (torch tensors), converted by duck typing.

The conversion is generic: every key ``"a.b.c.<leaf>"`` addresses the flax module at path
``("a", "b", "c")`` (the flax modules mirror torchvision's names) and ``<leaf>`` maps to a variable:

==================  ===========================  ==========================================
torch leaf          flax variable                transform
==================  ===========================  ==========================================
``weight`` (conv)   ``params/.../kernel``        OIHW -> HWIO
``weight`` (linear) ``params/.../kernel``        ``(out, in)`` -> ``(in, out)``
``weight`` (BN)     ``params/.../scale``         none
``bias``            ``params/.../bias``          none
``running_mean``    ``batch_stats/.../mean``     none
``running_var``     ``batch_stats/.../var``      none
``num_batches_tracked``  (ignored)
==================  ===========================  ==========================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxcam.models.resnet import BasicBlock, Bottleneck, ResNet, check_pooling, resnet18, resnet34, resnet50

__all__ = ["infer_resnet_config", "load_torchvision_resnet"]

_KNOWN_RESNETS: dict[tuple[tuple[int, ...], type[nn.Module]], Callable[..., ResNet]] = {
    ((2, 2, 2, 2), BasicBlock): resnet18,
    ((3, 4, 6, 3), BasicBlock): resnet34,
    ((3, 4, 6, 3), Bottleneck): resnet50,
}

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")

#: torch leaf name -> (flax collection, flax leaf name); ``None`` resolves to "kernel" or "scale".
_LEAVES: dict[str, tuple[str, str | None]] = {
    "weight": ("params", None),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_IGNORED_LEAVES = frozenset({"num_batches_tracked"})


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array of ``value``: a numpy array, anything array-like, or a torch tensor (duck typed)."""
    if hasattr(value, "detach"):
        value = value.detach()
        if hasattr(value, "cpu"):
            value = value.cpu()
        if hasattr(value, "numpy"):
            try:
                value = value.numpy()
            except TypeError:  # e.g. torch.bfloat16 has no numpy dtype
                value = value.float().numpy()
    return np.asarray(value)


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a flax kernel shape (HWIO -> OIHW, (in, out) -> (out, in))."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """Convert one torch-layout array to the flax layout of ``leaf``."""
    if leaf == "kernel":
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 2:
            array = array.T
    return np.ascontiguousarray(array, np.float32)


def infer_resnet_config(keys: Any) -> tuple[tuple[int, ...], type[nn.Module]]:
    """``(stage_sizes, block_cls)`` of a torchvision ResNet from its ``state_dict`` keys.

    The blocks per stage are counted from the ``layerN.i.`` prefixes; a ``conv3`` in the first block
    means :class:`Bottleneck`, otherwise :class:`BasicBlock`.
    """
    blocks: dict[int, set[int]] = {}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if sorted(blocks) != [1, 2, 3, 4]:
        found = ", ".join(f"layer{n}" for n in sorted(blocks)) or "none"
        raise ValueError(f"not a torchvision ResNet state_dict: expected stages layer1..layer4, found {found}")
    stage_sizes = tuple(max(blocks[n]) + 1 for n in (1, 2, 3, 4))
    bottleneck = any(key.startswith("layer1.0.conv3.") for key in keys)
    return stage_sizes, Bottleneck if bottleneck else BasicBlock


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def strip_module_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop a ``"module."`` prefix present on every key (``nn.DataParallel`` checkpoints)."""
    keys = list(state_dict)
    if keys and all(key.startswith("module.") for key in keys):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    model_label: str,
    *,
    to_flax: Callable[[tuple[str, ...]], tuple[str, ...]] = tuple,
    to_torch: Callable[[tuple[str, ...]], tuple[str, ...]] = tuple,
    input_shape: tuple[int, ...] = (1, 64, 64, 3),
) -> dict[str, Any]:
    """Convert a PyTorch ``state_dict`` to the variables of ``model`` (conv OIHW -> HWIO, depthwise
    ``(C, 1, k, k)`` -> ``(k, k, 1, C)``, linear transposed, BatchNorm -> scale/bias + mean/var).

    ``to_flax`` / ``to_torch`` map module paths between the two namings (identity by default). Every
    missing key, unexpected (or duplicate) key and shape mismatch is collected and raised in one
    ValueError naming ``model_label``. Shapes come from ``jax.eval_shape``: nothing is initialized.
    """
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))
    target_flat = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(dict(target)).items()}
    module_leaves: dict[tuple[str, ...], set[str]] = {}
    for collection, *module_path, leaf in target_flat:
        module_leaves.setdefault((collection, *module_path), set()).add(leaf)

    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    mismatched_paths: set[tuple[str, ...]] = set()
    for key, value in state_dict.items():
        *torch_path, last = key.split(".")
        if last in _IGNORED_LEAVES:
            continue
        if last not in _LEAVES:
            unexpected.append(key)
            continue
        collection, leaf = _LEAVES[last]
        module_path = to_flax(tuple(torch_path))
        if leaf is None:
            present = module_leaves.get((collection, *module_path), set())
            leaf = "kernel" if "kernel" in present else "scale"
        path = (collection, *module_path, leaf)
        if path not in target_flat or path in converted:  # unknown, or a second key for one variable
            unexpected.append(key)
            continue
        array = _to_numpy(value)
        expected = _torch_layout(target_flat[path]) if leaf == "kernel" else target_flat[path]
        if tuple(array.shape) != expected:
            mismatched.append(f"{key} (expected {expected}, got {tuple(array.shape)})")
            mismatched_paths.add(path)
            continue
        converted[path] = _from_torch(array, leaf)

    missing = [
        ".".join((*to_torch(path[1:-1]), _TORCH_LEAF[path[-1]]))
        for path in target_flat
        if path not in converted and path not in mismatched_paths
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(sorted(missing))}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {', '.join(mismatched)}")
        raise ValueError(f"state_dict does not match {model_label}: " + "; ".join(problems))
    return dict(traverse_util.unflatten_dict({path: jnp.asarray(a) for path, a in converted.items()}))


def load_torchvision_resnet(
    state_dict: Mapping[str, Any] | str | os.PathLike, *, pooling: str = "avg", dtype: Any = jnp.float32
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the flax ResNet matching a torchvision ResNet ``state_dict`` and convert its weights.

    The architecture (ResNet-18/34/50, or any torchvision-style depth such as 101/152) is inferred from
    the number of blocks per stage and the presence of ``conv3``; ``num_classes`` from ``fc.weight``.
    A ``"module."`` prefix on every key (``nn.DataParallel`` checkpoints) is stripped.

    Args:
        state_dict: ``model.state_dict()`` of a torchvision ResNet; values are numpy arrays or torch
            tensors (anything with ``.detach().cpu().numpy()``) — or the path of a checkpoint file
            (``.pth``, zip or legacy format, or ``.safetensors``), read safely without torch. torch is never
            imported here.
        pooling: the flax model's global pooling, ``"avg"`` (torchvision's) or ``"max"``.
        dtype: the flax model's computation dtype (the converted parameters are float32).

    Returns:
        ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``, ready for
        ``model.apply(variables, x_nhwc, train=False)``.

    Raises:
        ValueError: naming every missing key, unexpected key, and key whose shape does not match.
    """
    check_pooling(pooling)
    if isinstance(state_dict, (str, os.PathLike)):  # a checkpoint file, read without torch
        from flaxcam.models.torch_checkpoint import load_torch_state_dict

        state_dict = load_torch_state_dict(state_dict)
    state_dict = strip_module_prefix(state_dict)
    keys = list(state_dict)
    if "fc.weight" not in state_dict:
        raise ValueError("missing key 'fc.weight' in the ResNet state_dict (needed to infer num_classes)")
    fc_weight = _to_numpy(state_dict["fc.weight"])
    if fc_weight.ndim != 2:
        raise ValueError(f"shape mismatch for 'fc.weight': expected (num_classes, features), got {fc_weight.shape}")
    num_classes = int(fc_weight.shape[0])

    stage_sizes, block_cls = infer_resnet_config(keys)
    constructor = _KNOWN_RESNETS.get((stage_sizes, block_cls))
    if constructor is not None:
        model = constructor(num_classes=num_classes, pooling=pooling, dtype=dtype)
    else:
        model = ResNet(stage_sizes, block_cls, num_classes=num_classes, pooling=pooling, dtype=dtype)

    name = getattr(constructor, "__name__", f"ResNet{stage_sizes}")
    return model, convert_state_dict(state_dict, model, f"a torchvision {name}")
