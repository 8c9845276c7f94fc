"""The method registry: one small pure function per method, written for a single image.

Each method maps per-image inputs to a raw ``(h, w)`` map; :func:`flaxcam.explain` vmaps it over the
batch and the targets, then applies ReLU, min-max normalization and resizing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flaxcam.methods.cam import cam
from flaxcam.methods.gradient import (
    gradcam,
    gradcam_elementwise,
    gradcam_plusplus,
    hirescam,
    layercam,
    xgradcam,
)

#: Inputs a method may ask for: ``activations`` (h, w, C), ``gradients`` (h, w, C) of the target score,
#: ``class_weights`` (C,) of the target class in a pooling → Dense head.
INPUTS = ("activations", "gradients", "class_weights")


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its per-image function and the inputs it takes (by keyword)."""

    name: str
    fn: Callable
    inputs: tuple[str, ...]

    @property
    def needs_gradients(self) -> bool:
        return "gradients" in self.inputs

    @property
    def needs_head(self) -> bool:
        return "class_weights" in self.inputs


METHODS: dict[str, Method] = {
    "cam": Method("cam", cam, ("activations", "class_weights")),
    "gradcam": Method("gradcam", gradcam, ("activations", "gradients")),
    "hirescam": Method("hirescam", hirescam, ("activations", "gradients")),
    "gradcam_elementwise": Method("gradcam_elementwise", gradcam_elementwise, ("activations", "gradients")),
    "xgradcam": Method("xgradcam", xgradcam, ("activations", "gradients")),
    "layercam": Method("layercam", layercam, ("activations", "gradients")),
    "gradcam++": Method("gradcam++", gradcam_plusplus, ("activations", "gradients")),
}


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = [
    "INPUTS",
    "METHODS",
    "Method",
    "cam",
    "get_method",
    "gradcam",
    "gradcam_elementwise",
    "gradcam_plusplus",
    "hirescam",
    "layercam",
    "xgradcam",
]
