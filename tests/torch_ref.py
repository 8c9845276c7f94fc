"""The PyTorch reference helpers for the tests (parity extra only; flaxcam never imports torch).

The helpers live in :mod:`flaxcam.bench.torch_ref` (the benchmarks use them too); this module re-exports
them and adds the pytest-specific :func:`require_torch`.
"""

from __future__ import annotations

import os

import pytest

from flaxcam.bench.torch_ref import (
    define_torchvision_schemas,
    import_torchvision,
    randomize_batchnorm,
    torchvision_resnet,
)

__all__ = [
    "define_torchvision_schemas",
    "import_torchvision",
    "randomize_batchnorm",
    "require_torch",
    "torchvision_resnet",
]


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
