"""A parity test whose ``resnet18_pair`` is in float64 (``FLOAT64_SEEDS`` in ``test_cam_parity.py``) runs
with JAX's 64-bit mode on, so that flaxcam computes in float64 like the float64 reference."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True)
def _x64_for_float64_pairs(request):
    """JAX x64 on for the duration of a test whose ``resnet18_pair`` holds float64 images."""
    float64 = False
    if "resnet18_pair" in request.fixturenames:
        images = request.getfixturevalue("resnet18_pair")[4]
        float64 = str(images.dtype) == "torch.float64"
    if float64:
        with jax.enable_x64(True):
            yield
    else:
        yield
