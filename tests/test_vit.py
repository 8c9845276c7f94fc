"""Token models: a small Flax ViT explained through a ``reshape`` hook that turns tokens into a grid."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam

PATCH, GRID, DIM = 4, (4, 5), 16  # 16x20 images → 4x5 patches


class Block(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.LayerNorm()(tokens)
        tokens = tokens + nn.SelfAttention(num_heads=2, qkv_features=DIM)(h)
        h = nn.LayerNorm()(tokens)
        return tokens + nn.Dense(DIM)(nn.gelu(nn.Dense(2 * DIM)(h)))


class TinyViT(nn.Module):
    classes: int = 5

    def setup(self):
        self.embed = nn.Conv(DIM, (PATCH, PATCH), strides=PATCH, padding="VALID")
        self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, DIM))
        self.position = self.param("position", nn.initializers.normal(0.02), (1, 1 + GRID[0] * GRID[1], DIM))
        self.block0 = Block()
        self.block1 = Block()
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(self.classes)

    def tokens(self, x):
        patches = self.embed(x).reshape(x.shape[0], -1, DIM)
        cls = jnp.broadcast_to(self.cls, (x.shape[0], 1, DIM))
        return self.block0(jnp.concatenate([cls, patches], axis=1) + self.position)

    def classify(self, tokens):
        return self.head(self.norm(self.block1(tokens))[:, 0])

    def __call__(self, x):
        return self.classify(self.tokens(x))


def tokens_to_grid(tokens: jax.Array) -> jax.Array:
    """Drop the class token and lay the patch tokens out on their grid: (B, 1 + hw, D) -> (B, h, w, D)."""
    return tokens[:, 1:].reshape(tokens.shape[0], *GRID, tokens.shape[-1])


@pytest.fixture(scope="module")
def vit():
    model = TinyViT()
    images = jax.random.normal(jax.random.key(1), (3, 16, 20, 3))
    variables = model.init(jax.random.key(0), images)
    return model, variables, images


def test_gradcam_on_vit_tokens_equals_reference(vit):
    model, variables, images = vit
    out = flaxcam.explain(model, variables, images, method="gradcam", layer="block0", reshape=tokens_to_grid, top_k=2)
    assert out.maps.shape == (3, 2, 16, 20) and out.low_res.shape == (3, 2, *GRID)
    tokens = model.apply(variables, images, method=TinyViT.tokens)
    targets = np.asarray(out.targets)
    for t in range(2):
        def score(tok):
            logits = model.apply(variables, tok, method=TinyViT.classify)
            return jnp.take_along_axis(logits, jnp.asarray(targets[:, t : t + 1]), axis=1).sum()

        grads = np.asarray(tokens_to_grid(jax.grad(score)(tokens)), np.float64)
        acts = np.asarray(tokens_to_grid(tokens), np.float64)
        expected = np.einsum("bhwc,bc->bhw", acts, grads.mean(axis=(1, 2)))
        np.testing.assert_allclose(np.asarray(out.raw)[:, t], expected, rtol=1e-3, atol=1e-6)
    assert np.isfinite(np.asarray(out.maps)).all()


def test_reshape_errors(vit):
    model, variables, images = vit
    with pytest.raises(flaxcam.LayerError, match=r"not \(batch, height, width, channels\)"):
        flaxcam.explain(model, variables, images, layer="block0")
    with pytest.raises(ValueError, match="name the layer"):
        flaxcam.explain(model, variables, images, reshape=tokens_to_grid)
    with pytest.raises(ValueError, match="reshape must turn layer 'block0'"):
        flaxcam.explain(model, variables, images, layer="block0", reshape=lambda t: t)
    with pytest.raises(ValueError, match="ablationcam does not support reshape"):
        flaxcam.explain(model, variables, images, method="ablationcam", layer="block0", reshape=tokens_to_grid)
