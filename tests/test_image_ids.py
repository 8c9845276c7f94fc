"""Stochastic methods key their noise by the image's id, not its batch position (issue 13, item 8)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import flaxcam
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


@pytest.mark.parametrize("method", ["sscam", "smoothgradcam++", "randomcam"])
def test_same_image_same_map_whatever_its_batch_and_position(method):
    model = UserNet()
    variables, images = _setup(model, (4, 10, 12, 3))
    options = {"num_samples": 2} if method != "randomcam" else None
    kwargs = {"method": method, "layer": "mid", "key": jax.random.key(3), "method_options": options}
    ids = np.array([10, 11, 12, 13])
    whole = flaxcam.explain(model, variables, images, image_ids=ids, **kwargs)
    # image 2 alone, and images in another order inside a different batch (a resumed run)
    alone = flaxcam.explain(model, variables, images[2:3], image_ids=ids[2:3], **kwargs)
    order = np.array([3, 2, 0])
    shuffled = flaxcam.explain(model, variables, images[order], image_ids=ids[order], **kwargs)
    np.testing.assert_allclose(np.asarray(alone.maps[0]), np.asarray(whole.maps[2]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(shuffled.maps), np.asarray(whole.maps[order]), atol=1e-6)
    # without ids the noise follows the position: image 2 alone (position 0) draws other noise
    by_position = flaxcam.explain(model, variables, images[2:3], **kwargs)
    assert np.abs(np.asarray(by_position.maps[0]) - np.asarray(whole.maps[2])).max() > 1e-3
    # the explainer step takes the ids (or per-image keys) too
    fn = flaxcam.explainer(model, method=method, layer="mid", method_options=options)
    stepped = jax.jit(fn)(variables, images[2:3], key=jax.random.key(3), image_ids=ids[2:3])
    np.testing.assert_allclose(np.asarray(stepped.maps[0]), np.asarray(whole.maps[2]), atol=1e-6)
