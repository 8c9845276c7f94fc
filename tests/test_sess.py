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


def _patch_functions(zero_scores_for_image: int | None):
    """A stand-in base method: maps and scores that are fixed functions of each patch (so that the
    fusion, not a model, is under test); image ``zero_scores_for_image`` scores 0 on every patch."""

    def maps_of(crops):  # (n, w, w, 3) -> (n, 2, w, w): a signed map and a non-negative one
        return jnp.stack([crops[..., 0] - crops[..., 1], crops[..., 2] ** 2], axis=1)

    def scores_of(crops, image_index):  # (n, 2): one score per target; some negative (clipped to 0)
        scores = jnp.stack([crops.mean((1, 2, 3)), crops[..., 1].max((1, 2)) - 0.8], axis=1)
        if zero_scores_for_image is not None:
            scores = jnp.where((image_index == zero_scores_for_image)[:, None], 0.0, scores)
        return scores

    def explain_at(crops, image_index):
        return maps_of(crops), scores_of(crops, image_index)

    return maps_of, scores_of, explain_at


def _sess_float64(images, maps_of, scores_of, window, step, scales, pool, theta):
    """SESS's fusion in float64 NumPy, patch by patch, with the weights w_p = s_p / max_q s_q (1 when
    every score is 0) and the per-pixel mean of the pasted maps above theta (or their max)."""
    batch, height, width, _ = images.shape
    cut_rows, cut_cols, paste_rows, paste_cols = (
        np.asarray(m, np.float64) for m in patch_geometry(height, width, window, step, scales)
    )
    fused = np.zeros((batch, 2, height, width))
    for b in range(batch):
        crops = np.einsum("pih,hwc,pjw->pijc", cut_rows, np.asarray(images[b], np.float64), cut_cols)
        maps = np.asarray(maps_of(jnp.asarray(crops, jnp.float32)), np.float64)
        scores = np.maximum(
            np.asarray(scores_of(jnp.asarray(crops, jnp.float32), jnp.full(len(crops), b)), np.float64), 0
        )
        best = scores.max(axis=0)
        weights = np.where(best > 0, scores / np.where(best > 0, best, 1), 1.0)
        pasted = np.einsum("pHi,ptij,pWj->ptHW", paste_rows, maps * weights[..., None, None], paste_cols)
        if pool == "max":
            fused[b] = np.maximum(pasted.max(axis=0), 0)
        else:
            hit = pasted > theta
            counts = hit.sum(axis=0)
            fused[b] = np.where(counts > 0, (pasted * hit).sum(axis=0) / np.maximum(counts, 1), 0)
    return fused


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("theta", [0.0, 0.05])
def test_sess_fusion_equals_the_float64_definition(pool, theta):
    """theta = 0 without a pre-filter takes the one-pass path (scores from the base method's own forward
    pass, weights applied at the end); theta > 0 the two-pass path. Both equal the definition, also for
    an image whose patches all score 0 (weights 1)."""
    from flaxcam.methods.sess import sess

    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.random((3, 14, 18, 3)), jnp.float32)
    maps_of, scores_of, explain_at = _patch_functions(zero_scores_for_image=1)
    ours = sess(
        images,
        explain_at,
        scores_of,
        num_scales=3,
        window_size=8,
        step_size=5,
        theta=theta,
        pool=pool,
        smooth_sigma=0.0,
        chunk_size=7,
    )
    scale_step = round(8 * 2 / 7)
    expected = _sess_float64(images, maps_of, scores_of, 8, 5, tuple(8 + scale_step * i for i in range(3)), pool, theta)
    assert np.abs(expected[1]).max() > 0.1  # the all-zero-score image still has a map (weights 1)
    np.testing.assert_allclose(np.asarray(ours)[..., 0], expected, atol=2e-5)
