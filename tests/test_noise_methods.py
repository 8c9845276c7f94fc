"""Faster-ScoreCAM, SS-CAM, IS-CAM and SmoothGradCAM++ without PyTorch: float64 NumPy derivations on a
small CNN (the network itself is run by the model as an oracle, everything else is re-derived),
identities, reproducibility from the PRNG key, and option errors.

(SS-CAM, IS-CAM and SmoothGradCAM++ are also compared with torchcam on a ResNet-18 in tests/parity/.)
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import flaxcam
from flaxcam.methods import standard_normal_at
from flaxcam.methods.score import align_corners_matrix, half_pixel_matrix
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup

KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def net():
    model = UserNet()
    variables, images = _setup(model, (3, 16, 20, 3), seed=4)
    acts = np.asarray(model.apply(variables, images, method=lambda m, x: m.mid(m.stem(x))), np.float64)
    forward = jax.jit(lambda x: model.apply(variables, x))
    return model, variables, images, acts, lambda x: np.asarray(forward(np.asarray(x, np.float32)), np.float64)


def _softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _torchcam_masks64(acts_b: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, C) → (C, H, W): per-channel min-max at low resolution, then half-pixel bilinear."""
    shifted = acts_b - acts_b.min(axis=(0, 1))
    normalized = shifted / (shifted.max(axis=(0, 1)) + 1e-8)
    rows = half_pixel_matrix(height, acts_b.shape[0]).astype(np.float64)
    cols = half_pixel_matrix(width, acts_b.shape[1]).astype(np.float64)
    return np.einsum("Hh,hwc,Ww->cHW", rows, normalized, cols)


def test_half_pixel_matrix_matches_definition():
    # 2 → 4: output centres at input positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    expected = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], np.float32)
    np.testing.assert_allclose(half_pixel_matrix(4, 2), expected, atol=1e-7)
    assert np.allclose(half_pixel_matrix(13, 5).sum(axis=1), 1)


def test_faster_scorecam_with_all_channels_equals_scorecam(net):
    model, variables, images, acts, _ = net
    plain = flaxcam.explain(model, variables, images, method="scorecam", layer="mid", top_k=2, chunk_size=5)
    faster = flaxcam.explain(
        model,
        variables,
        images,
        method="faster_scorecam",
        layer="mid",
        top_k=2,
        chunk_size=7,
        method_options={"top_channels": acts.shape[-1]},
    )
    np.testing.assert_allclose(np.asarray(faster.raw), np.asarray(plain.raw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(faster.maps), np.asarray(plain.maps), atol=1e-5)


def test_faster_scorecam_equals_numpy_derivation(net):
    model, variables, images, acts, forward = net
    top = 4
    out = flaxcam.explain(
        model,
        variables,
        images,
        method="faster_scorecam",
        layer="mid",
        top_k=2,
        chunk_size=3,
        method_options={"top_channels": top},
    )
    height, width = images.shape[1:3]
    rows = align_corners_matrix(height, acts.shape[1]).astype(np.float64)
    cols = align_corners_matrix(width, acts.shape[2]).astype(np.float64)
    targets = np.asarray(out.targets)
    for b in range(len(acts)):
        variance = acts[b].reshape(-1, acts.shape[-1]).var(axis=0)
        selected = np.argsort(-variance, kind="stable")[:top]
        up = np.einsum("Hh,hwc,Ww->cHW", rows, acts[b][..., selected], cols)
        low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
        logits = forward(np.asarray(images[b])[None] * ((up - low) / (high - low + 1e-8))[..., None])
        for t, c in enumerate(targets[b]):
            weights = np.zeros(acts.shape[-1])
            weights[selected] = _softmax(logits[:, c])
            np.testing.assert_allclose(np.asarray(out.raw)[b, t], acts[b] @ weights, rtol=1e-3, atol=1e-5)
    # it is not Score-CAM: the dropped channels change the map
    plain = flaxcam.explain(model, variables, images, method="scorecam", layer="mid", top_k=2)
    assert np.abs(np.asarray(plain.low_res) - np.asarray(out.low_res)).max() > 0.01


def test_iscam_equals_numpy_derivation(net):
    model, variables, images, acts, forward = net
    steps = 3
    out = flaxcam.explain(
        model,
        variables,
        images,
        method="iscam",
        layer="mid",
        top_k=2,
        chunk_size=10,
        method_options={"num_samples": steps},
    )
    targets = np.asarray(out.targets)
    for b in range(len(acts)):
        masked = np.asarray(images[b], np.float64)[None] * _torchcam_masks64(acts[b], *images.shape[1:3])[..., None]
        coefficients = np.cumsum(np.arange(1, steps + 1) / steps)  # torchcam: coeff += (i + 1) / N
        logits = np.mean([forward(c * masked) for c in coefficients], axis=0)
        for t, c in enumerate(targets[b]):
            np.testing.assert_allclose(
                np.asarray(out.raw)[b, t], acts[b] @ _softmax(logits[:, c]), rtol=1e-3, atol=1e-5
            )


def test_sscam_equals_numpy_derivation_with_its_documented_noise(net):
    model, variables, images, acts, forward = net
    samples, std = 2, 0.5
    out = flaxcam.explain(
        model,
        variables,
        images,
        method="sscam",
        layer="mid",
        top_k=2,
        chunk_size=16,
        key=KEY,
        method_options={"num_samples": samples, "std": std},
    )
    layer_key = jax.random.fold_in(KEY, 0)
    height, width = images.shape[1:3]
    targets = np.asarray(out.targets)
    for b in range(len(acts)):
        masks = _torchcam_masks64(acts[b], height, width)
        logits = 0
        for m in range(samples):
            noise = np.stack(
                [np.asarray(standard_normal_at(layer_key, (b, m, k), (height, width))) for k in range(len(masks))]
            )
            logits = (
                logits + forward(np.asarray(images[b], np.float64)[None] * (masks + std * noise)[..., None]) / samples
            )
        for t, c in enumerate(targets[b]):
            np.testing.assert_allclose(
                np.asarray(out.raw)[b, t], acts[b] @ _softmax(logits[:, c]), rtol=1e-3, atol=1e-5
            )


def test_smoothgradcam_plusplus_equals_numpy_derivation(net):
    """Gradients of the noisy copies from jax.grad on the model split at the layer (no flaxcam probe)."""
    model, variables, images, acts, _ = net
    samples, std = 3, 0.2
    out = flaxcam.explain(
        model,
        variables,
        images,
        method="smoothgradcam++",
        layer="mid",
        top_k=2,
        key=KEY,
        method_options={"num_samples": samples, "std": std},
    )
    layer_key = jax.random.fold_in(KEY, 0)
    features = lambda x: model.apply(variables, x, method=lambda m, x: m.mid(m.stem(x)))
    rest = lambda a: model.apply(variables, a, method=lambda m, f: m.classify(m.top(f)))
    gradient = jax.jit(jax.grad(lambda a, c: rest(a)[0, c]))
    targets = np.asarray(out.targets)
    for b in range(len(acts)):
        noisy = [
            np.asarray(images[b : b + 1]) + std * np.asarray(standard_normal_at(layer_key, (b, m), images.shape[1:]))
            for m in range(samples)
        ]
        noisy_acts = [features(x) for x in noisy]
        for t, c in enumerate(targets[b]):
            grads = [np.asarray(gradient(a, c)[0], np.float64) for a in noisy_acts]
            square = np.mean([g**2 for g in grads], axis=0)
            cube = np.mean([g**3 for g in grads], axis=0)
            alpha = square / (2 * square + (cube * acts[b]).sum(axis=(0, 1)) + 1e-8)
            weights = (alpha * np.maximum(grads[-1], 0)).sum(axis=(0, 1))
            expected = np.asarray(noisy_acts[-1][0], np.float64) @ weights
            np.testing.assert_allclose(
                np.asarray(out.raw)[b, t], expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max()
            )


@pytest.mark.parametrize("method", ["sscam", "smoothgradcam++"])
def test_stochastic_methods_are_reproducible_from_the_key(net, method):
    model, variables, images, _, _ = net
    options = {"num_samples": 2}
    run = lambda key, x=images, chunk=8: flaxcam.explain(
        model, variables, x, method=method, layer="mid", key=key, chunk_size=chunk, method_options=options
    )
    first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(first.raw), np.asarray(again.raw))
    assert np.abs(np.asarray(first.raw) - np.asarray(other.raw)).max() > 1e-3
    # the draws depend on the key and on where they are used, not on the chunking or the batch padding
    if method == "sscam":  # (SmoothGradCAM++ runs no chunks)
        rechunked = run(jax.random.key(1), chunk=5)
        np.testing.assert_allclose(np.asarray(rechunked.raw), np.asarray(first.raw), rtol=1e-5, atol=1e-6)
    prefix = run(jax.random.key(1), x=images[:2])
    np.testing.assert_allclose(np.asarray(prefix.raw), np.asarray(first.raw)[:2], rtol=1e-5, atol=1e-6)


def test_method_options_are_validated(net):
    model, variables, images, _, _ = net
    assert flaxcam.METHODS["sscam"].options == {"num_samples": 35, "std": 2.0}
    assert flaxcam.METHODS["faster_scorecam"].forward_passes(512) == 10
    assert flaxcam.METHODS["iscam"].forward_passes(512, {"num_samples": 3}) == 1536
    with pytest.raises(
        ValueError, match=r"method 'iscam' has no option\(s\) \['std'\]; its options \(defaults\): num_samples=10"
    ):
        flaxcam.explain(model, variables, images, method="iscam", layer="mid", method_options={"std": 1.0})
    with pytest.raises(ValueError, match="top_channels=0 of method 'faster_scorecam' must be a positive integer"):
        flaxcam.explain(
            model, variables, images, method="faster_scorecam", layer="mid", method_options={"top_channels": 0}
        )
    with pytest.raises(ValueError, match="std=-1 of method 'smoothgradcam\\+\\+' must be a non-negative number"):
        flaxcam.explain(model, variables, images, method="smoothgradcam++", layer="mid", method_options={"std": -1})
    with pytest.raises(ValueError, match="method 'gradcam' has no option"):
        flaxcam.explain(model, variables, images, method="gradcam", layer="mid", method_options={"num_samples": 2})
