"""Import helpers for the PyTorch reference libraries (parity extra only; flaxcam never imports torch).

PyPI's torchvision wheel fails to import beside the CPU-only torch build because its C++ extension
registers ``torchvision::nms``/``qnms`` fake kernels for operators that do not exist without CUDA
libraries. Defining the two operator schemas first is enough for the models and for grad-cam.
"""

from __future__ import annotations

import os

import pytest

_LIBRARY = None


def define_torchvision_schemas():
    """Make PyPI's torchvision importable beside the CPU-only torch build (see the module docstring)."""
    global _LIBRARY
    import torch

    if _LIBRARY is None:
        try:
            torch.ops.torchvision.nms  # present when torchvision's extension can load
            _LIBRARY = "native"
        except (AttributeError, RuntimeError):
            _LIBRARY = torch.library.Library("torchvision", "DEF")
            _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def require_torch():
    """Return ``(torch, torchvision)``; skip (or fail when FLAXCAM_REQUIRE_PARITY=1) if not installed."""
    try:
        import torch
    except ImportError:
        if os.environ.get("FLAXCAM_REQUIRE_PARITY") == "1":
            pytest.fail("the parity extra (torch, torchvision, grad-cam, torchcam) is required but missing")
        pytest.skip("parity extra not installed: pip install -e '.[parity]'")
    define_torchvision_schemas()
    import torchvision

    torch.set_num_threads(2)
    return torch, torchvision
