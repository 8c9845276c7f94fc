"""The method registry: one small pure function per method.

A method returns per-channel *contributions* ``(h, w, C)`` for one image and one target (or
``(B, T, h, w, C)`` for a batch, for the score-based methods that run forward passes); the raw map is
their sum over channels, or their first principal component for the Eigen methods and with
``eigen_smooth=True``. :func:`flaxcam.explain` vmaps per-image methods over the batch and the targets,
then applies ReLU, min-max normalization and resizing.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flaxcam.methods.baseline import randomcam
from flaxcam.methods.cam import cam
from flaxcam.methods.eigen import (
    eigencam,
    eigengradcam,
    first_component_projection,
    kernel_pca_projection,
    kpcacam,
)
from flaxcam.methods.finer import finer_target_scores, finercam
from flaxcam.methods.fullgrad import fullgrad
from flaxcam.methods.gradient import (
    gradcam,
    gradcam_elementwise,
    gradcam_plusplus,
    gradcam_plusplus_exact,
    hirescam,
    layercam,
    shapleycam,
    xgradcam,
)
from flaxcam.methods.noise import smoothgradcam_plusplus, standard_normal_at
from flaxcam.methods.score import ablationcam, faster_scorecam, iscam, scorecam, sscam

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
INPUTS = (
    "activations", "gradients", "class_weights", "key", "images", "scores", "score", "ablate", "probe_at",
    "hvp", "second_derivatives", "third_derivatives", "input_gradients", "bias_gradients", "biases",
)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its function, the inputs it takes (by keyword) and how its per-channel
    contributions become a map (``"sum"``, ``"projection"`` or ``"kernel_projection"``). ``batched`` methods take the whole
    batch (they run forward passes); the others one image and one target. ``score_transform(logits,
    classes) -> (B, T)`` replaces the class targets' scores (FinerCAM). ``bias_layers`` methods ignore
    ``layer=`` and read the input and every biased conv / BatchNorm; their ``fn`` returns the map at the
    input resolution (FullGrad)."""

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

    def forward_passes(self, channels: int, options: Mapping[str, Any] | None = None) -> int | None:
        """Forward passes per image at a layer of ``channels`` channels with these options (defaults
        otherwise); None when the method is not counted in forward passes."""
        return None if self.passes is None else self.passes(channels, {**self.options, **(options or {})})

    @property
    def options(self) -> dict[str, Any]:
        """The method's keyword options (``explain(method_options=...)``) and their defaults."""
        parameters = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in parameters if p.name not in INPUTS and p.name != "chunk_size"}

    @property
    def needs_gradients(self) -> bool:
        return "gradients" in self.inputs

    @property
    def needs_head(self) -> bool:
        return "class_weights" in self.inputs


_GRADIENT = ("activations", "gradients")

METHODS: dict[str, Method] = {
    "cam": Method("cam", cam, ("activations", "class_weights")),
    "gradcam": Method("gradcam", gradcam, _GRADIENT),
    "hirescam": Method("hirescam", hirescam, _GRADIENT),
    "gradcam_elementwise": Method("gradcam_elementwise", gradcam_elementwise, _GRADIENT),
    "xgradcam": Method("xgradcam", xgradcam, _GRADIENT),
    "layercam": Method("layercam", layercam, _GRADIENT),
    "gradcam++": Method("gradcam++", gradcam_plusplus, _GRADIENT),
    "eigencam": Method("eigencam", eigencam, ("activations",), reduction="projection"),
    "eigengradcam": Method("eigengradcam", eigengradcam, _GRADIENT, reduction="projection"),
    "kpcacam": Method("kpcacam", kpcacam, ("activations",), reduction="kernel_projection"),
    "scorecam": Method("scorecam", scorecam, ("activations", "images", "score"), batched=True, passes=lambda c, o: c),
    "ablationcam": Method(
        "ablationcam", ablationcam, ("activations", "scores", "ablate"), batched=True, passes=lambda c, o: c
    ),
    "faster_scorecam": Method(
        "faster_scorecam", faster_scorecam, ("activations", "images", "score"), batched=True,
        passes=lambda c, o: min(c, o["top_channels"]),
    ),
    "sscam": Method(
        "sscam", sscam, ("activations", "images", "score", "key"), batched=True,
        passes=lambda c, o: c * o["num_samples"],
    ),
    "iscam": Method(
        "iscam", iscam, ("activations", "images", "score"), batched=True, passes=lambda c, o: c * o["num_samples"]
    ),
    "smoothgradcam++": Method(
        "smoothgradcam++", smoothgradcam_plusplus, ("activations", "images", "probe_at", "key"), batched=True
    ),
    "randomcam": Method("randomcam", randomcam, ("activations", "key")),
    "gradcam++exact": Method(
        "gradcam++exact", gradcam_plusplus_exact, (*_GRADIENT, "second_derivatives", "third_derivatives")
    ),
    "shapleycam": Method("shapleycam", shapleycam, (*_GRADIENT, "hvp")),
    "finercam": Method("finercam", finercam, _GRADIENT, score_transform=finer_target_scores),
    "fullgrad": Method(
        "fullgrad", fullgrad, ("images", "input_gradients", "bias_gradients", "biases"), reduction="none", bias_layers=True
    ),
}


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


__all__ = [
    "INPUTS",
    "ablationcam",
    "METHODS",
    "Method",
    "cam",
    "eigencam",
    "eigengradcam",
    "faster_scorecam",
    "finer_target_scores",
    "finercam",
    "first_component_projection",
    "fullgrad",
    "get_method",
    "gradcam",
    "gradcam_elementwise",
    "gradcam_plusplus",
    "gradcam_plusplus_exact",
    "hirescam",
    "iscam",
    "kernel_pca_projection",
    "kpcacam",
    "layercam",
    "randomcam",
    "scorecam",
    "shapleycam",
    "smoothgradcam_plusplus",
    "sscam",
    "standard_normal_at",
    "xgradcam",
]
