"""Planted-marker option of the digits canvases, and SmallCNN's ``downsamplings``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcam.data import draw_marker, make_digit_canvases, marker_region
from flaxcam.models import small_cnn


def test_marker_planted_on_the_requested_fraction_of_one_class_only():
    clean = make_digit_canvases(200, size=(48, 48), digit_size=(12, 24), seed=3)
    marked = make_digit_canvases(
        200,
        size=(48, 48),
        digit_size=(12, 24),
        seed=3,
        marker_class=7,
        marker_fraction=0.9,
        marker_corner="bottom_right",
    )
    np.testing.assert_array_equal(clean.labels, marked.labels)
    np.testing.assert_array_equal(clean.boxes, marked.boxes)
    assert not clean.marked.any()
    sevens = marked.labels == 7
    assert not marked.marked[~sevens].any()
    assert marked.marked[sevens].sum() == round(0.9 * sevens.sum())
    rows, cols = marker_region((48, 48), "bottom_right", 6)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (40, 46, 40, 46)
    # Images differ from the clean twin exactly inside the marker square of the marked images.
    changed = np.any(clean.images != marked.images, axis=-1)
    outside = changed.copy()
    outside[:, rows, cols] = False
    assert not outside.any()
    assert changed[marked.marked][:, rows, cols].mean() > 0.9
    assert not changed[~marked.marked].any()
    square = marked.images[marked.marked][:, rows, cols]
    assert square[:, 0, 0].min() == 1.0 and square[:, 2:4, 2:4].max() == 0.0  # white frame, black centre


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"marker_corner": "middle"}, "top_left, top_right"),
        ({"marker_fraction": 1.5}, "marker_fraction"),
        ({"marker_size": 60}, "marker_size"),
    ],
)
def test_marker_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_digit_canvases(4, size=(48, 48), digit_size=(12, 24), marker_class=1, **kwargs)


def test_draw_marker_on_any_images():
    """The marker of the canvases on any float images, as a copy: a white square with a black centre by
    default, a solid square of ``colour`` otherwise, on the selected images only."""
    images = np.full((3, 20, 30, 3), 0.5, np.float32)
    which = np.array([True, False, True])
    sticker = draw_marker(images, which, corner="top_right", size=6)
    rows, cols = marker_region((20, 30), "top_right", 6)
    assert (rows.start, cols.start) == (2, 22)
    assert (images == 0.5).all() and (sticker[1] == 0.5).all()
    square = sticker[0, rows, cols]
    assert square[0, 0].min() == 1.0 and square[2:4, 2:4].max() == 0.0  # white frame, black centre
    outside = sticker[0].copy()
    outside[rows, cols] = 0.5
    assert (outside == 0.5).all()
    solid = draw_marker(images, corner="bottom_left", size=4, colour=(1.0, 0.1, 0.9))
    rows, cols = marker_region((20, 30), "bottom_left", 4)
    np.testing.assert_array_equal(solid[:, rows, cols], np.broadcast_to(np.float32([1.0, 0.1, 0.9]), (3, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"marker size must be in \[1, 16\]"):
        draw_marker(images, size=17)


def _last_conv_shape(model, name: str) -> tuple[int, ...]:
    """Shape of ``name``'s output on a 32x32 input, by abstract evaluation (nothing compiled or run)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    capture = lambda m, _: m.name == name
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=capture, mutable=["intermediates"]), variables, x
    )
    return state["intermediates"][name]["__call__"][0].shape


def test_small_cnn_downsamplings_sets_the_last_feature_map_size():
    assert _last_conv_shape(small_cnn(num_classes=3, features=(4, 8, 8, 8), downsamplings=1), "conv4") == (1, 16, 16, 8)
    assert _last_conv_shape(small_cnn(num_classes=3, features=(4, 8, 8, 8), downsamplings=0), "conv4") == (1, 32, 32, 8)
    assert _last_conv_shape(small_cnn(num_classes=3, features=(4, 8, 8, 8)), "conv4") == (1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"downsamplings must be in \[0, 3\]"):
        small_cnn(features=(4, 8, 8, 8), downsamplings=4)


def test_background_canvases_have_no_digit_and_follow_the_seed():
    """Digit-free canvases: without clutter each one is a single colour plus Gaussian noise of the given
    standard deviation (no ink anywhere); the same seed gives the same canvases, another seed others."""
    from flaxcam.data import make_background_canvases

    plain = make_background_canvases(20, size=(40, 56), clutter_lines=0, noise=0.05, seed=4)
    assert plain.shape == (20, 40, 56, 3) and plain.dtype == np.float32
    assert plain.min() >= 0.0 and plain.max() <= 1.0
    colour = np.median(plain, axis=(1, 2), keepdims=True)
    assert np.all(colour <= 0.36)  # background colours are drawn in [0, 0.35]; digits are inked in [0.6, 1]
    residual = plain - colour
    unclipped = plain > 0.0
    assert abs(residual[unclipped].std() - 0.05) < 0.005
    assert residual.max() < 6 * 0.05  # a digit would put pixels >= 0.25 above the background
    cluttered = make_background_canvases(5, size=(40, 56), seed=4)
    np.testing.assert_array_equal(cluttered, make_background_canvases(5, size=(40, 56), seed=4))
    assert not np.array_equal(cluttered, make_background_canvases(5, size=(40, 56), seed=5))
    # clutter lines are drawn: more pixels far from the background colour than noise alone gives
    far = np.abs(cluttered - np.median(cluttered, axis=(1, 2), keepdims=True)).max(axis=-1) > 0.25
    assert far.mean(axis=(1, 2)).min() > 0.005


def test_with_background_class_adds_one_class_of_empty_canvases():
    from experiments import common

    spec = {"size": [32, 32], "digit_size": [12, 20], "clutter_lines": 1}
    digits = common.digits(spec, 30, seed=0)
    mixed = common.with_background_class(digits, spec, 12, seed=0)
    assert mixed.class_names == (*digits.class_names, "background")
    assert len(mixed.labels) == 42 and np.sum(mixed.labels == 10) == 12
    # the digit canvases are all still there, with their labels (only the order changed)
    kept = mixed.labels < 10
    order = np.argsort([np.flatnonzero((digits.images == im).all(axis=(1, 2, 3)))[0] for im in mixed.images[kept]])
    np.testing.assert_array_equal(mixed.labels[kept][order], digits.labels)
    np.testing.assert_array_equal(mixed.boxes[kept][order], digits.boxes)
    assert np.all(mixed.boxes[~kept] == 0)
    assert common.with_background_class(digits, spec, 0, seed=0) is digits
