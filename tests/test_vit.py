"""Token models: the library's tiny ViT explained through ``reshape=token_grid(model)``, which turns its
tokens into the patch grid; Grad-CAM checked against ``jax.grad`` on the model split at the layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.models import TinyViT, TokenGrid, init_variables, tiny_vit, token_grid

GRID = (4, 5)  # 16x20 images, 4x4 patches


@pytest.fixture(scope="module")
def vit():
    model = tiny_vit(num_classes=5, image_size=(16, 20), patch=4, dim=16, depth=2, heads=2)
    variables = init_variables(model, (1, 16, 20, 3))
    images = jax.random.normal(jax.random.key(1), (3, 16, 20, 3))
    return model, variables, images


def test_token_grid_lays_out_patch_tokens_row_major(vit):
    model, _, _ = vit
    reshape = token_grid(model)
    assert reshape == TokenGrid(GRID, 1) and hash(reshape) == hash(token_grid(GRID))  # reused across calls
    tokens = np.arange(2 * 21 * 3, dtype=np.float32).reshape(2, 21, 3)
    grid = np.asarray(reshape(tokens))
    assert grid.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(grid[1, 2, 3], tokens[1, 1 + 2 * 5 + 3])  # class token dropped
    with pytest.raises(ValueError, match=r"expects \(batch, 21, dim\) tokens, got \(2, 20, 3\)"):
        reshape(tokens[:, 1:])


def test_gradcam_on_vit_tokens_equals_reference(vit):
    model, variables, images = vit
    out = flaxcam.explain(
        model, variables, images, method="gradcam", layer="blocks_0", reshape=token_grid(model), top_k=2
    )
    assert out.maps.shape == (3, 2, 16, 20) and out.low_res.shape == (3, 2, *GRID)
    tokens = model.apply(variables, images, method=lambda m, x: m.encode(m.embed(x), 0, 1))
    targets = np.asarray(out.targets)
    to_grid = lambda t: np.asarray(t, np.float64)[:, 1:].reshape(3, *GRID, -1)
    for t in range(2):

        def score(tok, t=t):
            logits = model.apply(variables, tok, method=lambda m, x: m.classify(m.encode(x, 1)))
            return jnp.take_along_axis(logits, jnp.asarray(targets[:, t : t + 1]), axis=1).sum()

        grads = to_grid(jax.grad(score)(tokens))
        expected = np.einsum("bhwc,bc->bhw", to_grid(tokens), grads.mean(axis=(1, 2)))
        np.testing.assert_allclose(np.asarray(out.raw)[:, t], expected, rtol=1e-3, atol=1e-6)
    assert np.isfinite(np.asarray(out.maps)).all()
    assert (np.asarray(out.maps).reshape(6, -1).max(axis=1) > 0.5).all()


def test_vit_errors(vit):
    model, variables, _ = vit
    with pytest.raises(ValueError, match=r"built for images of size \(16, 20\), got \(16, 24\)"):
        model.apply(variables, jnp.zeros((1, 16, 24, 3)))
    with pytest.raises(ValueError, match="must be a multiple of patch=4"):
        TinyViT(image_size=(18, 20), patch=4).init(jax.random.key(0), jnp.zeros((1, 18, 20, 3)))


def test_reshape_errors(vit):
    model, variables, images = vit
    with pytest.raises(flaxcam.LayerError, match=r"not \(batch, height, width, channels\)"):
        flaxcam.explain(model, variables, images, layer="blocks_0")
    with pytest.raises(ValueError, match="name the layer"):
        flaxcam.explain(model, variables, images, reshape=token_grid(model))
    with pytest.raises(ValueError, match="reshape must turn layer 'blocks_0'"):
        flaxcam.explain(model, variables, images, layer="blocks_0", reshape=lambda t: t)
    with pytest.raises(ValueError, match="ablationcam does not support reshape"):
        flaxcam.explain(model, variables, images, method="ablationcam", layer="blocks_0", reshape=token_grid(model))
