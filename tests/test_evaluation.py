"""Faithfulness metrics (flaxcam.evaluation) against float64 NumPy loops written from the definitions,
SciPy's sparse direct solve for the ROAD imputation, and identities; plus every bad-input error.

The model is a small random CNN run in float64 (JAX x64) on both sides, so only the metric logic is
compared: each reference loops over images and steps in NumPy and calls the model once per input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

from flaxcam import evaluation, metrics
from flaxcam.models import init_variables, small_cnn

H, W = 12, 10


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        model = small_cnn(num_classes=5, features=(4, 8), dtype=jnp.float64)
        variables = init_variables(model, (1, H, W, 3), seed=0)
        variables = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), variables)
        rng = np.random.default_rng(0)
        images = rng.normal(size=(3, H, W, 3))
        maps = rng.random((3, H, W))
        maps[0, :4, :] = 0.5  # ties: raster order must break them
        targets = np.array([0, 3, 1])
    return model.apply, variables, images, maps, targets


_JITTED: dict[Callable[..., Any], Callable[..., Any]] = {}


def _score(apply_fn, variables, image, target, score="logit"):
    """The model's float64 score of one image (the forward pass is jitted once, the loop is NumPy)."""
    forward = _JITTED.setdefault(apply_fn, jax.jit(apply_fn))
    logits = np.asarray(forward(variables, jnp.asarray(image[None])))[0].astype(np.float64)
    if score == "softmax":
        logits = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return logits[target]


@pytest.mark.parametrize("score", ["logit", "softmax"])
def test_confidence_metrics_match_numpy(setup, score):
    apply_fn, variables, images, maps, targets = setup
    change = np.asarray(evaluation.confidence_change(apply_fn, variables, images, maps, targets, score=score))
    drop = np.asarray(evaluation.drop_in_confidence(apply_fn, variables, images, maps, targets, score=score))
    increase = np.asarray(evaluation.increase_in_confidence(apply_fn, variables, images, maps, targets, score=score))
    average = np.asarray(evaluation.average_drop(apply_fn, variables, images, maps, targets, score=score))
    for b in range(len(images)):
        s = _score(apply_fn, variables, images[b], targets[b], score)
        o = _score(apply_fn, variables, images[b] * maps[b][..., None], targets[b], score)
        np.testing.assert_allclose(change[b], o - s, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(drop[b], max(0.0, s - o), rtol=1e-9, atol=1e-12)
        assert increase[b] == float(o > s)
        expected = max(0.0, s - o) / (s + 1e-7) if s > 0 else np.nan
        np.testing.assert_allclose(average[b], expected, rtol=1e-9, atol=1e-12)


def test_average_drop_is_nan_where_the_score_is_not_positive(setup):
    apply_fn, variables, images, maps, _ = setup
    logits = np.asarray(apply_fn(variables, jnp.asarray(images)))
    negative = np.argmin(logits, axis=1)  # the lowest logit of each image: negative for this model?
    assert (logits[np.arange(3), negative] < 0).all()
    values = evaluation.average_drop(apply_fn, variables, images, maps, negative, score="logit")
    assert np.isnan(np.asarray(values)).all()


def _numpy_curves(apply_fn, variables, image, cam, target, steps, baseline, score):
    pixels = cam.size
    order = np.argsort(-cam.ravel(), kind="stable")
    step = -(-pixels // steps)
    counts = [*range(0, pixels, step), pixels]
    deletion, insertion = [], []
    for count in counts:
        top = np.zeros(pixels, bool)
        top[order[:count]] = True
        top = top.reshape(cam.shape)[..., None]
        deletion.append(_score(apply_fn, variables, np.where(top, baseline, image), target, score))
        insertion.append(_score(apply_fn, variables, np.where(top, image, baseline), target, score))
    fractions = np.asarray(counts) / pixels
    return fractions, np.asarray(deletion), np.asarray(insertion)


def _numpy_blur(image, sigma=5.0, size=11):
    offsets = np.arange(size) - size // 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.outer(g, g) / g.sum() ** 2
    padded = np.pad(image, ((size // 2,) * 2, (size // 2,) * 2, (0, 0)))
    out = np.zeros_like(image)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            out[y, x] = (padded[y : y + size, x : x + size] * kernel[..., None]).sum(axis=(0, 1))
    return out


@pytest.mark.parametrize("steps, baseline, chunk_size", [(20, "zeros", 32), (7, "mean", 5), (9, "blur", 64)])
def test_deletion_insertion_matches_numpy_loop(setup, steps, baseline, chunk_size):
    apply_fn, variables, images, maps, targets = setup
    curves = evaluation.deletion_insertion(
        apply_fn,
        variables,
        images,
        maps,
        targets,
        steps=steps,
        baseline=baseline,
        score="softmax",
        chunk_size=chunk_size,
    )
    for b in range(len(images)):
        reference = {
            "zeros": np.zeros_like(images[b]),
            "mean": np.broadcast_to(images[b].mean(axis=(0, 1)), images[b].shape),
            "blur": _numpy_blur(images[b]),
        }[baseline]
        fractions, deletion, insertion = _numpy_curves(
            apply_fn, variables, images[b], maps[b], targets[b], steps, reference, "softmax"
        )
        np.testing.assert_allclose(np.asarray(curves.fractions), fractions, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(curves.deletion[b]), deletion, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(curves.insertion[b]), insertion, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(curves.deletion_auc[b]), np.trapezoid(deletion, fractions), rtol=1e-9)
        np.testing.assert_allclose(np.asarray(curves.insertion_auc[b]), np.trapezoid(insertion, fractions), rtol=1e-9)


def test_deletion_ties_follow_raster_order(setup):
    """A constant map ranks pixels in raster order: deleting k pixels removes the first k of the image."""
    apply_fn, variables, images, _, targets = setup
    constant = np.full((3, H, W), 0.3)
    curves = evaluation.deletion_insertion(apply_fn, variables, images, constant, targets, steps=4, score="logit")
    raster = np.zeros((H * W,), bool)
    raster[:30] = True  # 120 pixels, 4 steps: 30 per step
    first = np.where(raster.reshape(H, W)[..., None], 0.0, images[1])
    np.testing.assert_allclose(
        np.asarray(curves.deletion[1, 1]), _score(apply_fn, variables, first, targets[1]), rtol=1e-9
    )


def _scipy_imputation(image, removed):
    """Independent float64 build of the ROAD system with SciPy (from the paper's definition)."""
    height, width = removed.shape
    weights = {
        (1, 1): 1 / 12,
        (0, 1): 1 / 6,
        (-1, 1): 1 / 12,
        (1, -1): 1 / 12,
        (0, -1): 1 / 6,
        (-1, -1): 1 / 12,
        (1, 0): 1 / 6,
        (-1, 0): 1 / 6,
    }
    unknown = list(zip(*np.nonzero(removed)))
    index = {p: i for i, p in enumerate(unknown)}
    matrix = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), image.shape[2]))
    for i, (y, x) in enumerate(unknown):
        total = 0.0
        for (dy, dx), w in weights.items():
            ny, nx = y + dy, x + dx
            if not (0 <= ny < height and 0 <= nx < width):
                continue
            total += w
            if removed[ny, nx]:
                matrix[i, index[(ny, nx)]] = -w
            else:
                rhs[i] += w * image[ny, nx]
        matrix[i, i] = total
    solution = scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs)
    out = image.copy()
    for i, (y, x) in enumerate(unknown):
        out[y, x] = solution[i]
    return out


def test_linear_imputation_matches_scipy():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(15, 17, 3))
    removed = rng.random((15, 17)) < 0.6
    removed[:, :5] = True  # a large removed block touching the border
    out = jax.jit(evaluation.linear_imputation)(jnp.asarray(image), jnp.asarray(removed))
    np.testing.assert_allclose(np.asarray(out), _scipy_imputation(image, removed), atol=1e-8)


def _numpy_road(apply_fn, variables, image, cam, target, percentile, order, score):
    values = cam if order == "morf" else 1 - cam
    removed = values >= np.percentile(values, percentile)
    imputed = _scipy_imputation(image, removed)
    return _score(apply_fn, variables, imputed, target, score) - _score(apply_fn, variables, image, target, score)


def test_road_matches_numpy(setup):
    apply_fn, variables, images, maps, targets = setup
    percentiles = (10, 45.5, 90)
    changes = evaluation.road(
        apply_fn, variables, images, maps, targets, percentiles=percentiles, noise=0.0, score="softmax", chunk_size=4
    )
    for order in ("morf", "lerf"):
        for i, p in enumerate(percentiles):
            for b in range(len(images)):
                expected = _numpy_road(apply_fn, variables, images[b], maps[b], targets[b], p, order, "softmax")
                np.testing.assert_allclose(np.asarray(changes[order][i, b]), expected, atol=1e-8)
    combined = evaluation.road_combined(
        apply_fn, variables, images, maps, targets, percentiles=percentiles, noise=0.0, score="softmax"
    )
    np.testing.assert_allclose(combined, (changes["lerf"].mean(0) - changes["morf"].mean(0)) / 2, atol=1e-12)


def test_road_noise_only_on_removed_pixels_and_reproducible(setup):
    apply_fn, variables, images, maps, targets = setup
    kwargs = {"percentiles": (50,), "orders": "morf", "score": "logit"}
    a = evaluation.road(apply_fn, variables, images, maps, targets, key=jax.random.key(3), **kwargs)["morf"]
    b = evaluation.road(apply_fn, variables, images, maps, targets, key=jax.random.key(3), **kwargs)["morf"]
    c = evaluation.road(apply_fn, variables, images, maps, targets, noise=0.0, **kwargs)["morf"]
    average = evaluation.road_average(
        apply_fn, variables, images, maps, targets, "morf", (50,), noise=0.0, score="logit"
    )
    np.testing.assert_allclose(average, c[0], atol=1e-12)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-9) and np.allclose(a, c, atol=0.2)


def test_road_noise_follows_the_image_id_not_its_place_in_the_batch(setup):
    """An image's imputation noise is keyed by its id: the same image scored first in one batch and last
    in another (or alone) gets the same ROAD value; without ids the position keys it."""
    apply_fn, variables, images, maps, targets = setup
    kwargs = {"percentiles": (30, 70), "orders": ("morf", "lerf"), "score": "logit", "key": jax.random.key(5)}
    ids = np.arange(len(images)) + 100
    order = np.arange(len(images))[::-1]
    forward = evaluation.road(apply_fn, variables, images, maps, targets, image_ids=ids, **kwargs)
    reverse = evaluation.road(
        apply_fn, variables, images[order], maps[order], targets[order], image_ids=ids[order], **kwargs
    )
    alone = evaluation.road(apply_fn, variables, images[-1:], maps[-1:], targets[-1:], image_ids=ids[-1:], **kwargs)
    for name in ("morf", "lerf"):
        np.testing.assert_allclose(reverse[name][:, order.argsort()], forward[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose(alone[name][:, 0], forward[name][:, -1], rtol=0, atol=1e-12)
    by_position = evaluation.road(apply_fn, variables, images, maps, targets, **kwargs)["morf"]
    reversed_by_position = evaluation.road(apply_fn, variables, images[order], maps[order], targets[order], **kwargs)
    assert not np.allclose(reversed_by_position["morf"][:, order.argsort()], by_position, atol=1e-9)
    with pytest.raises(ValueError, match=r"image_ids must be \d+ ints \(one per image\)"):
        evaluation.road(apply_fn, variables, images, maps, targets, image_ids=ids[:1], **kwargs)


def test_road_with_nothing_kept_imputes_zeros(setup):
    """Documented choice: a constant map removes every pixel at any percentile (ties at the threshold are
    removed); SciPy's system is singular there, flaxcam imputes 0 (the normalized mean) and stays finite."""
    apply_fn, variables, images, _, targets = setup
    constant = np.full((3, H, W), 0.25)
    changes = evaluation.road(
        apply_fn, variables, images, constant, targets, percentiles=(30,), noise=0.0, orders="morf"
    )
    zero_scores = np.asarray(apply_fn(variables, jnp.zeros((3, H, W, 3))))[np.arange(3), targets]
    original = np.asarray(apply_fn(variables, jnp.asarray(images)))[np.arange(3), targets]
    np.testing.assert_allclose(np.asarray(changes["morf"][0]), zero_scores - original, atol=1e-10)


def test_coherency_complexity_adcc_match_numpy(setup):
    apply_fn, variables, images, maps, targets = setup
    flipped = lambda images_, targets_: jnp.asarray(maps[:, ::-1] * 0.5 + images_[..., 0] ** 2)
    values = evaluation.adcc(flipped, apply_fn, variables, images, maps, targets)
    other = maps[:, ::-1] * 0.5 + (images * maps[..., None])[..., 0] ** 2
    for b in range(3):
        a, m = other[b].ravel(), maps[b].ravel()
        rho = np.cov(a, m)[0, 1] / (a.std(ddof=1) * m.std(ddof=1) + 1e-8)
        np.testing.assert_allclose(values["coherency"][b], (rho + 1) / 2, rtol=1e-9)
        np.testing.assert_allclose(values["complexity"][b], np.abs(maps[b]).mean(), rtol=1e-12)
    drop = evaluation.average_drop(apply_fn, variables, images, maps, targets, score="softmax")
    expected = 3 / (1 / values["coherency"] + 1 / (1 - values["complexity"]) + 1 / (1 - drop))
    np.testing.assert_allclose(values["adcc"], expected, rtol=1e-12)


def test_model_randomization_is_rank_correlation(setup):
    _apply_fn, variables, images, _, targets = setup
    model = small_cnn(num_classes=5, features=(4, 8), dtype=jnp.float64)
    fresh = init_variables(model, (1, H, W, 3), seed=7)
    explain_fn = evaluation.explainer(model, "gradcam", layer="conv2")
    rho = evaluation.model_randomization(explain_fn, variables, fresh, ["fc", "conv2"], images, targets)
    assert rho.shape == (2, 3)
    both = evaluation.randomize_layers(variables, fresh, ["fc", "conv2"])
    expected = metrics.rank_correlation(explain_fn(variables, images, targets), explain_fn(both, images, targets))
    np.testing.assert_allclose(rho[1], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="not in the model's parameters; its layers"):
        evaluation.randomize_layers(variables, fresh, ["layer9"])


def test_bad_inputs_have_clear_errors(setup):
    apply_fn, variables, images, maps, targets = setup
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, W\) = \(3, 12, 10\)"):
        evaluation.confidence_change(apply_fn, variables, images, maps[:, :5], targets)
    with pytest.raises(ValueError, match=r"maps must have shape"):
        evaluation.deletion_insertion(apply_fn, variables, images, maps[:, None], targets)
    bad = maps.copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values \(images \[2\]\)"):
        evaluation.road(apply_fn, variables, images, bad, targets)
    for percentile in (0, 100, -5, 120):
        with pytest.raises(ValueError, match=r"strictly inside \(0, 100\)"):
            evaluation.road(apply_fn, variables, images, maps, targets, percentiles=(50, percentile))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        evaluation.deletion_insertion(apply_fn, variables, images, maps, targets, steps=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        evaluation.deletion_insertion(apply_fn, variables, images, maps, targets, chunk_size=0)
    with pytest.raises(ValueError, match="unknown baseline 'noise'; valid: zeros, mean, blur"):
        evaluation.deletion_insertion(apply_fn, variables, images, maps, targets, baseline="noise")
    with pytest.raises(ValueError, match="unknown score 'prob'; valid: logit, softmax"):
        evaluation.confidence_change(apply_fn, variables, images, maps, targets, score="prob")
    with pytest.raises(ValueError, match=r"unknown ROAD order\(s\) \['best'\]; valid: morf, lerf"):
        evaluation.road(apply_fn, variables, images, maps, targets, orders="best")
    with pytest.raises(ValueError, match=r"targets must be one int class per image"):
        evaluation.confidence_change(apply_fn, variables, images, maps, targets[:2])
    with pytest.raises(
        ValueError, match=r"unknown metric\(s\) \['rod'\]; valid: all, confidence, deletion_insertion, road"
    ):
        evaluation.get_metrics("road,rod")
    assert [m.name for m in evaluation.get_metrics("all")] == list(evaluation.METRICS)


def test_registry_adcc_and_randomization_equal_the_functions(setup):
    """The leaderboard's ADCC and randomization columns are the library functions on the same batch."""
    apply_fn, variables, images, _, targets = setup
    from flaxcam.evaluation.registry import Batch

    model = small_cnn(num_classes=5, features=(4, 8), dtype=jnp.float64)
    fresh = init_variables(model, (1, H, W, 3), seed=7)
    explain_fn = evaluation.explainer(model, "gradcam", layer="conv2")
    maps = explain_fn(variables, images, targets)
    batch = Batch(apply_fn, variables, jnp.asarray(images), maps, jnp.asarray(targets), explain_fn, fresh, {})
    columns = evaluation.METRICS["adcc"].compute(batch)
    direct = evaluation.adcc(lambda x, t: explain_fn(variables, x, t), apply_fn, variables, images, maps, targets)
    for name in ("adcc", "coherency", "complexity"):
        np.testing.assert_allclose(columns[name], direct[name], rtol=1e-9)
    rho = evaluation.METRICS["randomization"].compute(batch)["randomization_rank_correlation"]
    np.testing.assert_allclose(
        rho, evaluation.model_randomization(explain_fn, variables, fresh, ["fc"], images, targets)[0]
    )


def test_randomization_default_is_the_classifier_not_the_alphabetically_last_layer():
    """EfficientNet-Lite0's parameter groups sort as ``_fc, head, stem``: the default used to pick ``stem``
    (fails before the fix); the classifier is the Dense kernel with as many outputs as logits."""
    from flaxcam.evaluation.registry import classifier_layer
    from flaxcam.models import efficientnet_lite0

    model = efficientnet_lite0(num_classes=7)
    variables = init_variables(model, (1, 32, 32, 3))
    assert list(variables["params"])[-1] != "_fc"
    assert classifier_layer(model.apply, variables, jnp.zeros((1, 32, 32, 3))) == "_fc"
