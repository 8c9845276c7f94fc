"""Targets beyond class logits: softmax, binary, segmentation masks, embedding similarity.

Each is checked against an independent gradient computed with ``jax.grad`` on the model split in two
halves (no flaxcam probe involved) and the float64 formula of the method. Segmentation targets are
tested on the library's FCN (:func:`flaxcam.models.fcn_resnet18`'s architecture, with a 2-stage
trunk to keep the test fast) with GradCAMElementWise, the method the seed material uses.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.models import FCN, init_variables
from flaxcam.targets import Binary, Embedding, Segmentation


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        return nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))


SEG_SIZE = (32, 40)  # the FCN's 2-stage trunk gives 4x5 features, upsampled x8


def _fcn(batch: int, seed: int = 0):
    """The library FCN with a small trunk (1 BasicBlock per stage, 2 stages), random weights; images of
    SEG_SIZE."""
    model = FCN(stage_sizes=(1, 1), num_classes=3)
    variables = init_variables(model, (1, *SEG_SIZE, 3), seed=seed)
    images = jax.random.normal(jax.random.key(seed + 1), (batch, *SEG_SIZE, 3))
    return model, variables, images


def _reference_elementwise(model, variables, images, score_of_output):
    """float64 GradCAMElementWise at the FCN's backbone output, from jax.grad through FCN.head."""
    features = model.apply(variables, images, method=lambda m, x: m.backbone(x))
    head = lambda f: model.apply(variables, f, SEG_SIZE, method=lambda m, a, size: m.head(a, size))
    grads = jax.grad(lambda f: score_of_output(head(f)).sum())(features)
    a, g = np.asarray(features, np.float64), np.asarray(grads, np.float64)
    return np.maximum(a * g, 0).sum(axis=-1)


class HeadNet(nn.Module):
    """Backbone + GAP + Dense(outputs): a classifier (outputs=K), binary (1) or embedding (D)."""

    outputs: int = 4

    def setup(self):
        self.backbone = Backbone()
        self.dense = nn.Dense(self.outputs)

    def head(self, features):
        return self.dense(features.mean((1, 2)))

    def __call__(self, x):
        return self.head(self.backbone(x))


def _init(model, batch=4, size=(16, 20), seed=0):
    images = jax.random.normal(jax.random.key(seed + 1), (batch, *size, 3))
    variables = model.init(jax.random.key(seed), images)
    return variables, images


def _reference_gradcam(model, variables, images, score_of_output):
    """float64 Grad-CAM at backbone's output from jax.grad of score_of_output(head(features))."""
    features = model.apply(variables, images, method=lambda m, x: m.backbone(x))
    grads = jax.grad(lambda f: score_of_output(model.apply(variables, f, method=lambda m, a: m.head(a))).sum())(
        features
    )
    a, g = np.asarray(features, np.float64), np.asarray(grads, np.float64)
    return np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2)))


def test_softmax_score_matches_reference():
    model = HeadNet(outputs=5)
    variables, images = _init(model)
    classes = np.array([0, 3, 1, 4])
    out = flaxcam.explain(
        model, variables, images, method="gradcam", layer="backbone", targets=classes, score="softmax"
    )
    expected = _reference_gradcam(model, variables, images, lambda o: jax.nn.softmax(o)[jnp.arange(4), classes])
    np.testing.assert_allclose(np.asarray(out.raw)[:, 0], expected, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(out.scores)[:, 0], np.asarray(out.probabilities)[np.arange(4), classes], rtol=1e-6
    )
    logit = flaxcam.explain(model, variables, images, method="gradcam", layer="backbone", targets=classes)
    assert np.abs(np.asarray(logit.raw) - np.asarray(out.raw)).max() > 1e-4  # a different score, a different map


def test_binary_target_signs():
    model = HeadNet(outputs=1)
    variables, images = _init(model)
    positive = flaxcam.explain(model, variables, images, method="gradcam", layer="backbone", targets=Binary(1))
    negative = flaxcam.explain(
        model, variables, images, method="gradcam", layer="backbone", targets=Binary([0, 0, 0, 0])
    )
    np.testing.assert_allclose(np.asarray(negative.raw), -np.asarray(positive.raw), rtol=1e-5, atol=1e-7)
    expected = _reference_gradcam(model, variables, images, lambda o: o[:, 0])
    np.testing.assert_allclose(np.asarray(positive.raw)[:, 0], expected, rtol=1e-3, atol=1e-7)
    mixed = flaxcam.explain(model, variables, images, method="gradcam", layer="backbone", targets=Binary([1, 0, 1, 0]))
    np.testing.assert_array_equal(np.asarray(mixed.targets)[:, 0], [1, 0, 1, 0])


def test_segmentation_targets_give_a_correct_nonzero_map_for_every_image_in_the_batch():
    """pytorch-grad-cam's issue #264: with a batch, only one image got a map. Here every image gets
    its own class and mask, a non-zero map equal to the float64 reference and to itself explained alone."""
    model, variables, images = _fcn(batch=4)
    height, width = SEG_SIZE
    rng = np.random.default_rng(0)
    classes = np.array([0, 2, 1, 2])
    masks = np.zeros((4, height, width), np.float32)
    for b in range(4):  # a different rectangle per image
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        masks[b, y : y + height // 2, x : x + width // 2] = 1
    target = Segmentation(classes=classes, masks=masks)
    out = flaxcam.explain(model, variables, images, method="gradcam_elementwise", layer="backbone", targets=target)

    def mask_score(output):
        return jnp.einsum("bhw,bhw->b", output[jnp.arange(4), :, :, classes], masks)

    expected = _reference_elementwise(model, variables, images, mask_score)
    raw = np.asarray(out.raw)[:, 0]
    np.testing.assert_allclose(raw, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
    assert (np.abs(raw).reshape(4, -1).max(axis=1) > 1e-4).all(), "an image of the batch got an empty map"
    assert (np.asarray(out.maps).reshape(4, -1).max(axis=1) > 0.5).all()
    np.testing.assert_allclose(
        np.asarray(out.scores)[:, 0], np.asarray(mask_score(model.apply(variables, images))), rtol=1e-4
    )
    for b in range(4):  # explained alone, each image gets the same map
        alone = flaxcam.explain(
            model,
            variables,
            images[b : b + 1],
            method="gradcam_elementwise",
            layer="backbone",
            targets=Segmentation(classes=classes[b : b + 1], masks=masks[b : b + 1]),
        )
        np.testing.assert_allclose(np.asarray(alone.maps)[0], np.asarray(out.maps)[b], atol=1e-5)


def test_segmentation_with_several_targets_and_shared_mask():
    model, variables, images = _fcn(batch=2, seed=1)
    mask = np.ones(SEG_SIZE, np.float32)
    out = flaxcam.explain(
        model,
        variables,
        images,
        method="gradcam_elementwise",
        layer="backbone.layer1",
        targets=Segmentation(classes=np.array([[0, 1, 2], [2, 1, 0]]), masks=mask),
    )
    assert out.maps.shape == (2, 3, *SEG_SIZE) and out.low_res.shape == (2, 3, 8, 10)
    # same class, same mask → same map regardless of the order it was asked in
    swapped = flaxcam.explain(
        model,
        variables,
        images,
        method="gradcam_elementwise",
        layer="backbone.layer1",
        targets=Segmentation(classes=np.array([[2, 1, 0], [0, 1, 2]]), masks=mask),
    )
    np.testing.assert_allclose(np.asarray(swapped.raw)[0, 2], np.asarray(out.raw)[0, 0], rtol=1e-5, atol=1e-7)
    # and different classes give different maps
    assert np.abs(np.asarray(out.raw)[0, 0] - np.asarray(out.raw)[0, 2]).max() > 1e-4


def test_embedding_similarity_target():
    model = HeadNet(outputs=6)
    variables, images = _init(model)
    concepts = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    out = flaxcam.explain(model, variables, images, method="gradcam", layer="backbone", targets=Embedding(concepts))
    embeddings = np.asarray(model.apply(variables, images), np.float64)
    cosine = embeddings @ concepts.T / np.linalg.norm(embeddings, axis=1)[:, None] / np.linalg.norm(concepts, axis=1)
    np.testing.assert_allclose(np.asarray(out.scores), cosine, rtol=1e-4)

    def similarity(output):
        c = jnp.asarray(concepts[1])
        return output @ c / (jnp.linalg.norm(output, axis=1) * jnp.linalg.norm(c))

    expected = _reference_gradcam(model, variables, images, similarity)
    np.testing.assert_allclose(np.asarray(out.raw)[:, 1], expected, rtol=1e-3, atol=1e-7)


def test_target_errors():
    seg, variables, images = _fcn(batch=2)
    with pytest.raises(ValueError, match=r"class targets need \(batch, classes\) logits.*Segmentation"):
        flaxcam.explain(seg, variables, images, layer="backbone")
    with pytest.raises(ValueError, match=r"Segmentation.masks must be .* at the output's resolution \(32, 40\)"):
        flaxcam.explain(seg, variables, images, layer="backbone", targets=Segmentation(0, np.ones((8, 10))))
    with pytest.raises(ValueError, match="aug_smooth does not support Segmentation"):
        flaxcam.explain(
            seg, variables, images, layer="backbone", targets=Segmentation(0, np.ones(SEG_SIZE)), aug_smooth=True
        )
    head = HeadNet(outputs=4)
    variables, images = _init(head, batch=2)
    with pytest.raises(ValueError, match=r"Binary targets need one logit per image"):
        flaxcam.explain(head, variables, images, layer="backbone", targets=Binary(1))
    with pytest.raises(ValueError, match="concept vectors have 3 dims but the embedding has 4"):
        flaxcam.explain(head, variables, images, layer="backbone", targets=Embedding(np.ones(3)))
    with pytest.raises(ValueError, match="score must be one of 'logit', 'softmax', 'rest'"):
        flaxcam.explain(head, variables, images, layer="backbone", score="prob")
