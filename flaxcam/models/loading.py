"""One way to turn "a model name and/or a weights file" into ``(model, variables, meta)``.

The command line (``flaxcam explain / audit / evaluate / layers``) and the benchmark both load models
through :func:`load_model`; each adds only what is its own (the CLI its class names and warnings, the
benchmark user factories and NNX twins). Sources, in the order they are tried:

* ``weights`` — a torchvision ResNet checkpoint (``.pth``, ``.pt``, ``.safetensors``; read without
  torch) or a flaxcam bundle (anything else; :func:`flaxcam.models.load_bundle`), checked against its
  model;
* ``name`` ``None`` or ``"efficientnet_lite0"`` — the pretrained default, EfficientNet-Lite0 on ImageNet;
* another registered ``name`` — that model with seeded random weights (``meta["random_weights"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # flax and jax are imported when a model is loaded, not with this module
    import flax.linen as nn

#: Suffixes of a torchvision checkpoint; any other weights file is read as a flaxcam bundle.
TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")
DEFAULT_SIZE = (224, 224)


def with_dtype(model: nn.Module, dtype: Any) -> tuple[nn.Module, str]:
    """``model`` computing in ``dtype`` and where the dtype went: ``"module"`` (its ``dtype`` field) or
    ``"inputs"`` (a module without one: only the images can be cast)."""
    import jax.numpy as jnp

    if jnp.dtype(dtype) == jnp.float32:
        return model, "module"
    if "dtype" in getattr(model, "__dataclass_fields__", {}):
        return model.clone(dtype=dtype), "module"
    return model, "inputs"


def load_model(
    name: str | None = None,
    weights: str | Path | None = None,
    *,
    dtype: Any = "float32",
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, variables, meta)`` from a weights file, the pretrained default or a registry name.

    ``meta`` always has ``input_size`` ``[H, W]``, ``source`` (what was loaded, for messages),
    ``random_weights`` (True for a registry model without weights), ``imagenet_order`` (a torchvision
    checkpoint: 1000 outputs are ImageNet's classes) and ``dtype_applied`` (:func:`with_dtype`); a bundle's
    or the pretrained model's own keys (``class_names``, ``target_layer``, ``mean``, ``std``, ...) are kept.
    ``input_size`` sets a registry model's initialization size (default 224×224).

    Raises:
        FileNotFoundError: ``weights`` is not a file.
        ValueError: an unknown ``name`` (the message lists the registered models), or a bundle whose
            variables do not fit its model.
    """
    import jax.numpy as jnp

    from flaxcam import models

    meta: dict[str, Any]
    if weights is not None:
        path = Path(weights)
        source = f"--weights {weights}"
        if not path.is_file():
            raise FileNotFoundError(f"{source}: not a file")
        if path.suffix in TORCH_SUFFIXES:
            model, variables = models.load_torchvision_resnet(path, dtype=dtype)
            meta = {"input_size": list(DEFAULT_SIZE), "target_layer": "layer4", "imagenet_order": True}
            applied = "module"
        else:
            model, variables, bundle_meta = models.load_bundle(path)
            meta = dict(bundle_meta or {})
            models.check_variables(model, variables, (1, *meta.get("input_size", DEFAULT_SIZE), 3), source)
            model, applied = with_dtype(model, dtype)
    elif name is None or name == "efficientnet_lite0":
        pretrained, variables, pretrained_meta = models.pretrained_efficientnet_lite0()
        model, applied = with_dtype(pretrained, dtype)
        meta, source = dict(pretrained_meta), "the pretrained EfficientNet-Lite0"
    else:
        if name not in models.MODELS:
            raise ValueError(f"unknown model {name!r}; models: {', '.join(sorted(models.MODELS))}")
        model = models.create_model(name, **({} if jnp.dtype(dtype) == jnp.float32 else {"dtype": dtype}))
        size = tuple(input_size or DEFAULT_SIZE)
        variables = models.init_variables(model, (1, *size, 3), seed=seed)
        meta, source, applied = {"input_size": list(size), "random_weights": True}, f"model {name}", "module"
    meta.setdefault("random_weights", False)
    meta.setdefault("imagenet_order", False)
    meta.setdefault("input_size", list(DEFAULT_SIZE))
    meta.update(source=source, dtype_applied=applied)
    return model, variables, meta
