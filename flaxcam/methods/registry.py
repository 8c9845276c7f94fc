"""The method registry: ``@register("name", ...)`` above a method's function records it in :data:`METHODS`.

A method is registered once, where it is defined: its name is written once and the inputs it needs are
read from its signature (the parameters named in :data:`INPUTS`); the other parameters with defaults
are its options (``explain(method_options=...)``). ``chunk_size`` is passed by the pipeline.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

#: Inputs a method may ask for. Per image: ``activations`` (h, w, C), ``gradients`` (h, w, C) of the
#: target score, ``class_weights`` (C,) of the target class in a pooling → Dense head, ``key`` (a PRNG
#: key). Batched methods: ``activations`` (B, h, w, C), ``images``, ``scores`` (B, T) and
#: ``score(images, image_index)`` / ``ablate(delta, image_index)`` (the target scores of new inputs, or
#: of the images with ``delta`` added at the layer, standing for the images ``image_index``),
#: ``probe_at(new_images)`` (activations and target gradients at the layer for a new batch, e.g. noisy
#: copies of the images, with the targets chosen on the originals).
#: Higher derivatives, per image and target ``(h, w, C)``: ``hvp`` (Hessian of the score times the
#: activations), ``second_derivatives`` / ``third_derivatives`` (diagonals of the 2nd / 3rd derivative).
#: FullGrad's (per image and target): ``images`` ``(H, W, 3)``, ``input_gradients`` ``(H, W, 3)``,
#: ``bias_gradients`` and ``biases`` (tuples over every biased conv / BatchNorm of the model).
#: Meta-methods (batched): ``softmax_score(images, image_index)`` (``score`` with class targets scored by
#: their softmax probability) and ``explain_at(images, image_index)`` (the normalized ``(n, T, H', W')``
#: maps of the method named by the ``base`` option for new inputs, e.g. patches, with the targets'
#: ``softmax_score`` from the same forward pass).
#: Attention methods (per image and target): ``attention_gradients``, a tuple over the blocks named by
#: ``layer=`` of the gradients ``(heads, N, N)`` of each block's own class score with respect to its
#: attention probabilities.
INPUTS = (
    "activations",
    "gradients",
    "class_weights",
    "key",
    "images",
    "scores",
    "score",
    "ablate",
    "probe_at",
    "hvp",
    "second_derivatives",
    "third_derivatives",
    "input_gradients",
    "bias_gradients",
    "biases",
    "softmax_score",
    "explain_at",
    "attention_gradients",
)

#: Parameters the pipeline passes itself (never user options).
PIPELINE_PARAMETERS = ("chunk_size",)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its function, the inputs it takes (by keyword) and how its per-channel
    contributions become a map (``"sum"``, ``"projection"``, ``"signed_projection"`` or
    ``"kernel_projection"``). ``batched`` methods take the whole batch (they run forward passes); the
    others one image and one target. ``score_transform(logits, classes) -> (B, T)`` replaces the class
    targets' scores (FinerCAM). ``bias_layers`` methods ignore ``layer=`` and read the input and every
    biased conv / BatchNorm; their ``fn`` returns the map at the input resolution (FullGrad).
    ``layer_fusion`` is how the maps of several layers become one: ``"mean"`` of the upsampled maps
    (pytorch-grad-cam's multi-layer aggregation) or their ``"product"`` (RefineCAM). ``attention_layers``
    methods read the attention probabilities of the transformer blocks named by ``layer=`` and fuse the
    blocks themselves (LeGrad)."""

    name: str
    fn: Callable
    inputs: tuple[str, ...]
    reduction: str = "sum"
    batched: bool = False
    score_transform: Callable | None = None
    bias_layers: bool = False
    #: forward passes per image for a layer of ``C`` channels, ``passes(C, options)`` with every option
    #: given (the score-based methods' cost; None for methods that run the batch about once)
    passes: Callable[[int, Mapping[str, Any]], int] | None = None
    layer_fusion: str = "mean"
    #: the gradients are taken with every ReLU backpropagating as a guided ReLU (guided backpropagation)
    guided: bool = False
    #: the method also explains 5-D ``(B, D, H, W, C)`` layers of 3-D networks (volumes, video)
    volumetric: bool = False
    #: ``layer=`` names transformer blocks; the method reads their attention probabilities and returns
    #: one relevance per key token ``(N,)``, laid out on the patch grid by the step (LeGrad)
    attention_layers: bool = False

    def forward_passes(self, channels: int, options: Mapping[str, Any] | None = None) -> int | None:
        """Forward passes per image at a layer of ``channels`` channels with these options (defaults
        otherwise); None when the method is not counted in forward passes."""
        return None if self.passes is None else self.passes(channels, {**self.options, **(options or {})})

    @property
    def options(self) -> dict[str, Any]:
        """The method's keyword options (``explain(method_options=...)``) and their defaults."""
        parameters = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in parameters if p.name not in INPUTS and p.name not in PIPELINE_PARAMETERS}

    @property
    def needs_gradients(self) -> bool:
        return "gradients" in self.inputs

    @property
    def needs_head(self) -> bool:
        return "class_weights" in self.inputs


#: Every registered method by name, in registration order.
METHODS: dict[str, Method] = {}


def signature_inputs(fn: Callable) -> tuple[str, ...]:
    """The :data:`INPUTS` that ``fn`` takes, in the order of its signature; a TypeError names any other
    parameter without a default (it could be neither an input nor an option)."""
    parameters = inspect.signature(fn).parameters.values()
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in INPUTS]
    if required:
        raise TypeError(
            f"{fn.__name__}: parameters {required} are not method inputs ({', '.join(INPUTS)}) and have no default"
        )
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.name in INPUTS)


def register(name: str, **attributes: Any) -> Callable[[Callable], Callable]:
    """Decorator: register the function as method ``name`` with its inputs read from its signature and
    the other :class:`Method` attributes given as keywords (``reduction=``, ``batched=``, ...). A name
    registered twice is a ValueError."""

    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered (by {METHODS[name].fn.__qualname__})")
        METHODS[name] = Method(name, fn, signature_inputs(fn), **attributes)
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None
