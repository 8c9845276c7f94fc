"""SESS's geometry, blur and bad input (its maps are compared with pytorch-grad-cam in tests/parity/)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.methods.sess import gaussian_blur, patch_geometry, window_starts
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


def test_windows_cover_the_axis_and_the_last_one_is_shifted_back_inside():
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(8, 4, 4) == [0, 4]
    assert window_starts(3, 4, 4) == [0]
    cut_rows, cut_cols, _, paste_cols = patch_geometry(6, 8, 6, 6, (6, 9))
    assert cut_rows.shape[0] == 1 * 2 + 2 * 2  # scale 6 (6 x 8): 1 x 2 windows; scale 9 (9 x 12): 2 x 2
    np.testing.assert_allclose(cut_rows[0], np.eye(6), atol=1e-7)  # scale 6 is the image itself:
    np.testing.assert_allclose(cut_cols[1], np.eye(8)[2:], atol=1e-7)  # its second window starts at column 2
    np.testing.assert_allclose(paste_cols[1], np.eye(8)[:, 2:], atol=1e-7)  # and is pasted back there


def test_gaussian_blur_equals_the_float64_separable_definition():
    rng = np.random.default_rng(0)
    image = rng.random((13, 17))
    offsets = np.arange(11) - 5
    kernel = np.exp(-(offsets**2) / 50.0)
    kernel /= kernel.sum()
    padded = np.pad(image, 5, mode="reflect")  # OpenCV's BORDER_REFLECT_101
    expected = np.array(
        [[np.sum(np.outer(kernel, kernel) * padded[i : i + 11, j : j + 11]) for j in range(17)] for i in range(13)]
    )
    np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(image, jnp.float32))), expected, atol=1e-6)


def test_sess_runs_and_bad_options_name_the_valid_ones():
    model = UserNet()
    variables, images = _setup(model, (2, 16, 20, 3), seed=2)
    out = flaxcam.explain(model, variables, images, method="sess", layer="mid", method_options={"num_scales": 2})
    assert out.maps.shape == (2, 1, 16, 20) and np.isfinite(np.asarray(out.maps)).all()
    with pytest.raises(ValueError, match=r"unknown or unsupported base method 'gradcam\+'; valid bases: .*gradcam"):
        flaxcam.explain(model, variables, images, method="sess", layer="mid", method_options={"base": "gradcam+"})
    with pytest.raises(ValueError, match="valid bases"):  # a batched method cannot run on the patches
        flaxcam.explain(model, variables, images, method="sess", layer="mid", method_options={"base": "scorecam"})
    with pytest.raises(ValueError, match="pool must be 'mean' or 'max'"):
        flaxcam.explain(model, variables, images, method="sess", layer="mid", method_options={"pool": "avg"})
