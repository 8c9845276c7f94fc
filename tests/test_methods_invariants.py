"""Invariants that every registered method must satisfy, parametrized over ``flaxcam.METHODS`` (a new
method joins these tests by registering itself).

On a small CNN (two convs of 4 and 8 channels, 4 classes, non-square 12x20 inputs, two targets per
image): finite maps in [0, 1] on zero, constant, saturated, random and very large inputs and with
extreme option values; batch invariance (an image in a batch gives the map it gives alone); the jitted
step equals the same step run op by op (``jax.disable_jit``); determinism; bf16 inputs; and the input
check (NaN or infinite pixels are refused, naming the images).

The attention methods (``Method.attention_layers``: LeGrad) read a vision transformer's attention
probabilities, which a CNN does not have: they run the same cases on a tiny ViT instead (the same 12x20
inputs in 4x4 patches, a 3x5 grid, 2 blocks, 4 classes; every block, ``reshape=token_grid(model)``).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam import models
from flaxcam.errors import NonFiniteInputError

HEIGHT, WIDTH = 12, 20
TOP_K = 2
#: A white pixel after ImageNet normalization, the largest value a preprocessed photo takes.
SATURATED = (1.0 - 0.406) / 0.225
METHOD_NAMES = sorted(flaxcam.METHODS)


@pytest.fixture(scope="module")
def small():
    model = models.create_model("small_cnn", num_classes=4, features=[4, 8])
    variables = models.init_variables(model, (1, HEIGHT, WIDTH, 3), seed=0)
    return model, variables


@pytest.fixture(scope="module")
def vit():
    model = models.tiny_vit(num_classes=4, image_size=(HEIGHT, WIDTH), patch=4, dim=16, depth=2, heads=2)
    variables = models.init_variables(model, (1, HEIGHT, WIDTH, 3), seed=0)
    return model, variables


def _setup(name: str, small, vit) -> tuple:
    """``(model, variables, explain kwargs)`` for the method: the tiny ViT for attention methods."""
    if flaxcam.METHODS[name].attention_layers:
        model, variables = vit
        return model, variables, {"reshape": models.token_grid(model)}
    return *small, {}


def _random(count: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(count, HEIGHT, WIDTH, 3)) * scale).astype(np.float32)


def _inputs() -> dict[str, np.ndarray]:
    """One image of each kind; the random one first (keyed methods: batch position 0 is compared)."""
    checker = np.indices((HEIGHT, WIDTH)).sum(axis=0) % 2
    return {
        "random": _random(1, seed=1),
        "large": _random(1, seed=2, scale=1e12),
        "zero": np.zeros((1, HEIGHT, WIDTH, 3), np.float32),
        "constant": np.full((1, HEIGHT, WIDTH, 3), 0.7, np.float32),
        "saturated": np.full((1, HEIGHT, WIDTH, 3), SATURATED, np.float32),
        "checker": np.repeat((checker * 2 * SATURATED - SATURATED)[None, ..., None], 3, axis=-1).astype(np.float32),
    }


def _maps(model, variables, images, name: str, **kwargs) -> np.ndarray:
    return np.asarray(flaxcam.explain(model, variables, images, method=name, top_k=TOP_K, **kwargs).maps, np.float32)


def _assert_unit_maps(maps: np.ndarray, what: str) -> None:
    assert np.isfinite(maps).all(), f"{what}: {int((~np.isfinite(maps)).sum())} non-finite values"
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6, f"{what}: values in [{maps.min()}, {maps.max()}]"


def _cheap_options(name: str) -> dict:
    """Sampling methods run with at most 4 samples here (their cost is linear in it; the extreme-option
    test covers the option itself)."""
    options = flaxcam.METHODS[name].options
    return {"num_samples": 4} if options.get("num_samples", 0) > 4 else {}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_finite_unit_maps_batch_invariance_determinism_and_jit_equals_op_by_op(small, vit, name):
    """On a batch of a random, a very large (1e12), a zero, a constant, a saturated and a checkerboard
    image: every map is finite and in [0, 1]; a second call gives identical bits; and the first two
    images explained alone, with the step run op by op (``jax.disable_jit``), give the maps they get in
    the jitted batch: batch invariance (keyed methods draw noise by batch position, and positions 0 and
    1 stay the same) and jit == eager (XLA's fusions change nothing beyond rounding)."""
    model, variables, kwargs = _setup(name, small, vit)
    kinds = _inputs()
    images = np.concatenate(list(kinds.values()))
    options = _cheap_options(name)
    maps = _maps(model, variables, images, name, method_options=options, **kwargs)
    assert maps.shape == (len(images), TOP_K, HEIGHT, WIDTH)
    for index, kind in enumerate(kinds):
        _assert_unit_maps(maps[index], f"{name} on a {kind} image")
    np.testing.assert_array_equal(_maps(model, variables, images, name, method_options=options, **kwargs), maps)

    with jax.disable_jit():
        alone = _maps(model, variables, images[:2], name, method_options=options, **kwargs)
    np.testing.assert_allclose(alone, maps[:2], atol=1e-4, err_msg=f"{name}: alone and op by op")
    if flaxcam.METHODS[name].batched:  # chunk_size bounds memory only
        chunked = _maps(model, variables, images[:2], name, chunk_size=1, method_options=options, **kwargs)
        np.testing.assert_allclose(chunked, maps[:2], atol=2e-5, err_msg=f"{name}: chunk_size=1")


def _extreme_options(name: str) -> list[dict]:
    """The method's options all at their low extremes at once (floats 0, integers 1), then all at their
    high extremes (floats 1e30, integers 10**6 where that stays cheap: at most 4 forward passes per
    channel, else 1)."""
    method = flaxcam.METHODS[name]
    low, high = {}, {}
    for option, default in method.options.items():
        if isinstance(default, bool):
            continue
        if isinstance(default, float):
            low[option], high[option] = 0.0, 1e30
        elif isinstance(default, int):
            passes = method.forward_passes(8, {option: 10**6})
            low[option], high[option] = 1, 10**6 if passes is not None and passes <= 32 else 1
    return [options for options in (low, high) if options]


@pytest.mark.parametrize(
    "name, options",
    [(name, options) for name in METHOD_NAMES for options in _extreme_options(name)],
    ids=lambda value: value if isinstance(value, str) else ",".join(f"{k}={v:g}" for k, v in value.items()),
)
def test_extreme_option_values_give_finite_maps(small, vit, name, options):
    model, variables, kwargs = _setup(name, small, vit)
    images = np.concatenate([_random(1, seed=3), _inputs()["zero"], _inputs()["saturated"]])
    try:
        maps = _maps(model, variables, images, name, method_options=options, **kwargs)
    except ValueError as error:  # a range check that names the option is the other acceptable answer
        assert any(option in str(error) for option in options), f"{name} with {options}: {error}"  # noqa: PT017
        return
    _assert_unit_maps(maps, f"{name} with {options}")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bfloat16_inputs(small, vit, name):
    """bf16 images (float32 weights) give finite maps in [0, 1], close to those of the same values in
    float32."""
    model, variables, kwargs = _setup(name, small, vit)
    images = jnp.asarray(np.concatenate(list(_inputs().values())), jnp.bfloat16)
    low = _maps(model, variables, images, name, method_options=_cheap_options(name), **kwargs)
    _assert_unit_maps(low, f"{name} on bf16 input")
    same_values = np.asarray(images.astype(jnp.float32))
    reference = _maps(model, variables, same_values, name, method_options=_cheap_options(name), **kwargs)
    assert np.abs(low - reference).mean() < 0.05, name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_naming_the_images(small, bad):
    model, variables = small
    images = _random(4, seed=9)
    images[1, 3, 4, 0] = bad
    images[3, 0, 0, 2] = bad
    with pytest.raises(NonFiniteInputError, match=r"images 1, 3 of the batch of 4 have NaN or infinite pixels"):
        flaxcam.explain(model, variables, images, method="gradcam")
    with pytest.raises(ValueError, match="images 1, 3"):  # also as a jax.Array, and as a ValueError
        flaxcam.explain(model, variables, jnp.asarray(images), method="cam")


def test_ablationcam_zero_target_score_uses_the_absolute_drop(small):
    """A zero target score (all-zero image through a bias-free net): pytorch-grad-cam divides by it
    (NaN map); flaxcam weighs channels by the absolute drop. Checked against NumPy on the model's own
    ablated scores."""
    from flaxcam.methods.score import ablationcam

    activations = jnp.asarray(np.random.default_rng(10).uniform(0, 1, (1, 3, 4, 5)), jnp.float32)
    scores = jnp.zeros((1, 1), jnp.float32)
    ablated = np.array([-1.0, 2.0, 0.5, 0.0, -3.0], np.float32)

    def ablate(delta, image_index):  # the ablated score of whichever channel delta changes
        def host(delta):
            return ablated[np.argmax(np.abs(delta).sum(axis=(1, 2)), axis=-1)][:, None]

        return jax.pure_callback(host, jax.ShapeDtypeStruct((delta.shape[0], 1), jnp.float32), delta)

    contributions = ablationcam(activations, scores, ablate, chunk_size=5)
    expected = np.asarray(activations)[:, None] * (0.0 - ablated)[None, None, None, None, :]
    np.testing.assert_allclose(np.asarray(contributions), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "images_shape, kwargs, message",
    [
        ((2, 3, HEIGHT, WIDTH), {}, "look channels-first (B, C, H, W)"),
        ((1, 1, 1, 3), {}, "too small for layer 'conv2': its output has shape (1, 0, 0, 8)"),
        ((1, HEIGHT, WIDTH, 3), {"layer": 123}, "layer= must be a layer name"),
        ((1, HEIGHT, WIDTH, 3), {"devices": []}, "devices= is empty"),
    ],
    ids=["channels-first", "smaller-than-receptive-field", "layer-123", "no-devices"],
)
def test_explain_refuses_bad_arguments_with_a_clear_error(small, images_shape, kwargs, message):
    from flaxcam.errors import UserError

    model, variables = small
    with pytest.raises(UserError, match=re.escape(message)):
        flaxcam.explain(model, variables, np.ones(images_shape, np.float32), **kwargs)
