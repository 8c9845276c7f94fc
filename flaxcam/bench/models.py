"""The model a benchmark runs: where it comes from (a JSON-able spec) and how a worker builds it.

Four sources, in the order they are tried:

* ``factory="package.module:function"`` — any user model: the function (called without arguments)
  returns ``(model, variables)`` for a linen module, optionally ``(model, variables, meta)`` with
  ``meta["input_size"] = (H, W)`` / ``meta["channels"]``, or an ``nnx.Module``;
* ``weights=PATH`` — a flaxcam bundle (``flaxcam train`` writes one) or a torchvision ResNet checkpoint
  (``.pth`` / ``.pt``, read without torch);
* ``name`` — a registered reference model (:data:`flaxcam.models.MODELS`, seeded random weights:
  speed does not depend on their values);
* nothing (or ``name="efficientnet_lite0"``) — the pretrained default, EfficientNet-Lite0 on ImageNet.

With ``api="nnx"`` a reference model (ResNet-18/34/50, EfficientNet-Lite0) is built as its NNX twin
holding the same weights as the linen model of the same spec (:data:`NNX_TWINS`), so the two APIs are
timed on identical weights.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flaxcam.models.loading import DEFAULT_SIZE


@dataclasses.dataclass
class LoadedModel:
    """A model ready to time. ``api`` is ``"linen"`` (``model.apply(variables, x)``) or ``"nnx"``
    (``model(x)``; ``variables`` is None). ``dtype_applied`` says where ``--dtype`` went: ``"module"``
    (the module's own ``dtype`` field: its computation) or ``"inputs"`` (the images only)."""

    model: Any
    variables: Any
    api: str
    layer: str | None
    input_size: tuple[int, int]
    channels: int
    dtype_applied: str


def describe(name: str | None = None, weights: str | None = None, factory: str | None = None) -> str:
    """A short label of the model for tables and file records."""
    if factory:
        return factory
    if weights:
        return Path(weights).name
    return name or "efficientnet_lite0"


def check_source(name: str | None, weights: str | None, factory: str | None) -> None:
    """Reject a bad model source before any worker starts (one clear message each)."""
    if sum(value is not None for value in (name, weights, factory)) > 1 and not (name and weights):
        raise ValueError("give one model: --model NAME, --model package.module:factory or --weights PATH")
    if factory is not None:
        module, _, function = factory.partition(":")
        if not module or not function or not all(part.isidentifier() for part in [*module.split("."), function]):
            raise ValueError(f"--model {factory!r}: a user model is written package.module:function")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    if name is not None and factory is None:
        from flaxcam.models import MODELS

        if name not in MODELS:
            raise ValueError(
                f"unknown model {name!r}: registered models are {', '.join(sorted(MODELS))}, "
                "or give package.module:factory"
            )


def import_factory(target: str) -> Callable[[], Any]:
    """The function named by ``"package.module:function"``."""
    module_name, _, function_name = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, function_name)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no function {function_name!r}") from None


def _is_nnx(model: Any) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


#: Reference models with an NNX twin: name -> ``module:function`` taking the linen variables.
NNX_TWINS = {
    "resnet18": "flaxcam.models.nnx_resnet:resnet18_nnx",
    "resnet34": "flaxcam.models.nnx_resnet:resnet34_nnx",
    "resnet50": "flaxcam.models.nnx_resnet:resnet50_nnx",
    "efficientnet_lite0": "flaxcam.models.nnx_efficientnet:efficientnet_lite0_nnx",
}


def _nnx_twin(loaded: LoadedModel, name: str) -> LoadedModel:
    """``loaded`` (a linen reference model) as its NNX twin with the same weights."""
    if name not in NNX_TWINS or loaded.api != "linen":
        raise ValueError(f"api='nnx' needs a reference model with an NNX twin: {', '.join(NNX_TWINS)}; got {name!r}")
    num_classes = loaded.variables["params"]["fc" if name.startswith("resnet") else "_fc"]["kernel"].shape[-1]
    build: Callable[..., Any] = import_factory(NNX_TWINS[name])
    twin = build(loaded.variables, num_classes=num_classes)
    return dataclasses.replace(loaded, model=twin, variables=None, api="nnx", dtype_applied="inputs")


def load(spec: Mapping[str, Any]) -> LoadedModel:
    """Build the model of a worker spec (keys ``model``, ``weights``, ``factory``, ``layer``, ``size``,
    ``dtype``, ``seed``, ``api``)."""
    if spec.get("api", "linen") == "nnx":
        if spec.get("factory") or spec.get("weights"):
            raise ValueError("api='nnx' builds the NNX twin of a reference model (--model NAME), not a file or factory")
        name = spec.get("model") or "efficientnet_lite0"
        return _nnx_twin(load({**spec, "api": "linen", "dtype": "float32"}), name)
    import jax.numpy as jnp

    from flaxcam import models

    dtype = jnp.dtype(spec.get("dtype", "float32"))
    size = tuple(spec["size"]) if spec.get("size") else None
    layer = spec.get("layer")
    if spec.get("factory"):
        result = import_factory(spec["factory"])()
        if _is_nnx(result):
            if hasattr(result, "eval"):
                result.eval()  # inference: BatchNorm statistics, no dropout
            return LoadedModel(result, None, "nnx", layer, size or DEFAULT_SIZE, 3, "inputs")
        if not isinstance(result, tuple) or len(result) not in (2, 3):
            raise ValueError(
                f"{spec['factory']} must return (model, variables), (model, variables, meta) or an nnx.Module; "
                f"it returned {type(result).__name__}"
            )
        model, variables = result[0], result[1]
        meta = dict(result[2]) if len(result) == 3 else {}
        model, applied = models.with_dtype(model, dtype)
        return LoadedModel(
            model,
            variables,
            "linen",
            layer or meta.get("target_layer"),
            size or tuple(meta.get("input_size", DEFAULT_SIZE)),
            int(meta.get("channels", 3)),
            applied,
        )
    model, variables, meta = models.load_model(
        spec.get("model"), spec.get("weights"), dtype=dtype, input_size=size, seed=spec.get("seed", 0)
    )
    return LoadedModel(
        model,
        variables,
        "linen",
        layer or meta.get("target_layer"),
        size or tuple(meta["input_size"]),
        3,
        meta["dtype_applied"],
    )
