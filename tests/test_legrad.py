"""LeGrad on the library's tiny ViT: the map equals its definition computed block by block with
``jax.grad`` (the one-backward-pass step cuts the gradient between blocks, and the cut matters), the
default patch grid, the jitted explainer, and clear errors for models and requests it cannot explain.
Parity with torchcam: ``tests/parity/test_legrad_parity.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.models import TinyViT, init_variables, tiny_vit, token_grid
from flaxcam.probe import forward_at_layers

GRID = (3, 5)  # 12x20 images in 4x4 patches
BLOCKS = ("blocks_0", "blocks_1", "blocks_2")
ATTENTION = tuple(f"{block}.attention.probabilities" for block in BLOCKS)
CLASSES = np.array([[1, 3], [0, 2], [4, 1]])


@pytest.fixture(scope="module")
def vit():
    model = tiny_vit(num_classes=5, image_size=(12, 20), patch=4, dim=16, depth=3, heads=2)
    variables = init_variables(model, (1, 12, 20, 3), seed=2)
    images = jax.random.normal(jax.random.key(3), (3, 12, 20, 3))
    return model, variables, images


def _reference(model, variables, images, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LeGrad's definition, one ``jax.grad`` per block and target: ``(T, blocks, B, N)``, the mean over
    heads and queries of the positive gradient of block ``l``'s class score w.r.t. its attention
    probabilities; and ``(T, B, N)``, the same for block 0 with the gradient of the sum of every block's
    score (no cut). ``classes``: ``(B, T)``."""

    def relevance(variables, images, classes, index: int, cut: bool):
        zeros = [jnp.zeros_like(a) for a in forward_at_layers(model, variables, images, ATTENTION)[1]]

        def score(delta):
            deltas = tuple(delta if i == index else z for i, z in enumerate(zeros))
            _, values, _ = forward_at_layers(model, variables, images, (*BLOCKS, *ATTENTION), (None,) * 3 + deltas)
            scored = [index] if cut else range(len(BLOCKS))
            logits = [model.apply(variables, values[i], method=TinyViT.project_tokens) for i in scored]
            return sum(jnp.take_along_axis(lg, classes[:, None], axis=1).sum() for lg in logits)

        gradient = jax.grad(score)(zeros[index])  # (B, heads, N, N)
        return jnp.mean(jax.nn.relu(gradient), axis=(1, 2))

    def both(variables, images, classes):
        per_block = [
            jnp.stack([relevance(variables, images, classes[:, t], i, True) for i in range(len(BLOCKS))])
            for t in range(classes.shape[1])
        ]
        uncut = [relevance(variables, images, classes[:, t], 0, False) for t in range(classes.shape[1])]
        return jnp.stack(per_block), jnp.stack(uncut)

    per_block, uncut = jax.jit(both)(variables, images, jnp.asarray(classes))
    return np.asarray(per_block), np.asarray(uncut)


def test_legrad_equals_its_definition_block_by_block(vit):
    model, variables, images = vit
    out = flaxcam.explain(model, variables, images, method="legrad", targets=CLASSES, reshape=token_grid(model))
    assert out.layer == BLOCKS and out.raw.shape == out.low_res.shape == (3, 2, *GRID)
    assert out.maps.shape == (3, 2, 12, 20)
    np.testing.assert_array_equal(np.asarray(out.targets), CLASSES)
    raw = np.asarray(out.raw)
    per_block, uncut = _reference(model, variables, images, CLASSES)
    for t in range(CLASSES.shape[1]):
        expected = per_block[t].mean(axis=0)[:, 1:].reshape(3, *GRID)  # class token dropped
        np.testing.assert_allclose(raw[:, t], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        # without the cut, block 0's attention would also get the gradient of the later blocks' scores
        assert np.abs(uncut[t] - per_block[t, 0]).max() > 0.05 * np.abs(per_block[t, 0]).max()


def test_default_square_grid_and_jitted_explainer(vit):
    """With no reshape=, one class token and a square grid (torchcam's default); the explainer's step
    under ``jax.jit`` with the grid given explicitly gives the same maps."""
    model = tiny_vit(num_classes=5, image_size=(16, 16), patch=4, dim=16, depth=2, heads=2)
    variables = init_variables(model, (1, 16, 16, 3), seed=0)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    default = flaxcam.explain(model, variables, images, method="legrad", layer="blocks_1", targets=[0, 3])
    fn = flaxcam.explainer(model, method="legrad", layer="blocks_1", targets="classes", reshape=token_grid(model))
    jitted = jax.jit(fn)(variables, images, np.array([[0], [3]]))
    assert jitted.layer == default.layer == "blocks_1" and jitted.low_res.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(np.asarray(jitted.maps), np.asarray(default.maps), atol=1e-5)
    assert (np.asarray(default.maps).reshape(2, -1).max(axis=1) > 0.99).all()


class NoProjection(TinyViT):
    project_tokens = None  # type: ignore[assignment]


def test_legrad_errors(vit):
    model, variables, images = vit
    cnn = flaxcam.models.create_model("small_cnn", num_classes=4, features=[4, 8])
    cnn_variables = init_variables(cnn, (1, 12, 20, 3))
    with pytest.raises(flaxcam.LayerError, match=r"attention probabilities .* computes none; its layers are: .*conv2"):
        flaxcam.explain(cnn, cnn_variables, images, method="legrad")
    with pytest.raises(flaxcam.LayerError, match=r"Blocks of this model: \['blocks_0', 'blocks_1', 'blocks_2'\]"):
        flaxcam.explain(model, variables, images, method="legrad", layer="blocks_0.attention")
    with pytest.raises(flaxcam.LayerError, match=r"16 keys, not one class token and a square patch grid"):
        flaxcam.explain(model, variables, images, method="legrad")
    grid = token_grid(model)
    with pytest.raises(ValueError, match="legrad explains class targets"):
        flaxcam.explain(model, variables, images, method="legrad", reshape=grid, targets=lambda out: out[:, 0])
    with pytest.raises(ValueError, match="takes no aug_smooth"):
        flaxcam.explain(model, variables, images, method="legrad", reshape=grid, aug_smooth=True)
    bare = NoProjection(num_classes=5, image_size=(12, 20), patch=4, dim=16, depth=3, heads=2)
    with pytest.raises(flaxcam.LayerError, match="project_tokens"):
        flaxcam.explain(bare, variables, images, method="legrad", reshape=grid)
