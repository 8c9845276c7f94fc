"""Planted-marker option of the digits canvases, and SmallCNN's ``downsamplings``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcam.data import make_digit_canvases, marker_region
from flaxcam.models import small_cnn


def test_marker_planted_on_the_requested_fraction_of_one_class_only():
    clean = make_digit_canvases(200, size=(48, 48), digit_size=(12, 24), seed=3)
    marked = make_digit_canvases(200, size=(48, 48), digit_size=(12, 24), seed=3, marker_class=7, marker_fraction=0.9, marker_corner="bottom_right")
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
    [({"marker_corner": "middle"}, "top_left, top_right"), ({"marker_fraction": 1.5}, "marker_fraction"), ({"marker_size": 60}, "marker_size")],
)
def test_marker_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_digit_canvases(4, size=(48, 48), digit_size=(12, 24), marker_class=1, **kwargs)


def _last_conv_shape(model, name: str) -> tuple[int, ...]:
    """Shape of ``name``'s output on a 32x32 input, by abstract evaluation (nothing compiled or run)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    capture = lambda m, _: m.name == name  # noqa: E731
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=capture, mutable=["intermediates"]), variables, x)
    return state["intermediates"][name]["__call__"][0].shape


def test_small_cnn_downsamplings_sets_the_last_feature_map_size():
    assert _last_conv_shape(small_cnn(num_classes=3, features=(4, 8, 8, 8), downsamplings=1), "conv4") == (1, 16, 16, 8)
    assert _last_conv_shape(small_cnn(num_classes=3, features=(4, 8, 8, 8), downsamplings=0), "conv4") == (1, 32, 32, 8)
    assert _last_conv_shape(small_cnn(num_classes=3, features=(4, 8, 8, 8)), "conv4") == (1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"downsamplings must be in \[0, 3\]"):
        small_cnn(features=(4, 8, 8, 8), downsamplings=4)
