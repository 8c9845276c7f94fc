"""3-D inputs: which methods explain ``(B, D, H, W, C)`` volumes (CT / MRI, video) and the checks.

A volumetric method (``Method.volumetric``: Grad-CAM, HiResCAM, LayerCAM, FEM) reads a 5-D layer of a
3-D network the way it reads a 2-D one, with the depth as one more spatial axis; its map is
normalized over the volume and upsampled to the input volume as pytorch-grad-cam does
(``scipy.ndimage.zoom``, :func:`flaxcam.ops.resize_volumes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flaxcam.methods.registry import METHODS, Method
from flaxcam.probe import LayerInfo


def volumetric_methods() -> list[str]:
    """The registered methods that explain 5-D layers."""
    return [name for name, method in METHODS.items() if method.volumetric]


def check_volumetric(
    method: Method, layers: Sequence[LayerInfo], images: Any, *, aug_smooth: bool = False, eigen_smooth: bool = False
) -> None:
    """A ValueError, naming the valid choices, when volumes meet a 2-D-only method or option, or a
    layer's dimensionality does not match the input's."""
    volumes = images.ndim == 5
    three_d = [info for info in layers if len(info.shape) == 5]
    if (volumes or three_d) and not method.volumetric:
        where = f"layer {three_d[0].name!r} has a 3-D output {three_d[0].shape}" if three_d else "the input is a volume"
        raise ValueError(
            f"method {method.name!r} explains 2-D images only, but {where}; methods for (batch, depth, "
            f"height, width, channels) layers: {', '.join(volumetric_methods())}"
        )
    for info in layers:
        if len(info.shape) != images.ndim:
            kind = "volumes (B, D, H, W, C)" if volumes else "images (B, H, W, C)"
            raise ValueError(
                f"layer {info.name!r} has shape {info.shape}; explaining {kind} needs a layer with "
                f"{images.ndim} dimensions"
            )
    if volumes and (aug_smooth or eigen_smooth):
        raise ValueError("aug_smooth and eigen_smooth are for 2-D images; they do not support volumes")
