"""Box rules of flaxcam.localize.boxes against float64 NumPy / scipy.ndimage / scikit-image references,
and the atrous option of the reference models against the à trous identity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from flaxcam import localize, models


def _smooth_maps(seed: int, count: int = 6, shape: tuple[int, int] = (24, 20)) -> np.ndarray:
    """Random smooth maps with several blobs and negative parts (float32), like CAMs before ReLU."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, *shape))
    maps = np.stack([ndimage.gaussian_filter(n, sigma=rng.uniform(1.0, 3.0)) for n in noise])
    return (maps + rng.uniform(-0.02, 0.05, size=(count, 1, 1))).astype(np.float32)


def _reference_box(mask: np.ndarray) -> list[int]:
    """Box of the largest 8-connected component (ties: first in raster order), scipy.ndimage."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return [0, 0, 0, 0]
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _reference_resolution_threshold(h: int, w: int) -> float:
    return max(0.2, 1.0 - 0.8 * min(h, w) / 14.0)


def _reference_energy_cut(m: np.ndarray, share: float) -> float:
    values = np.sort(np.maximum(m.astype(np.float64), 0.0).ravel())[::-1]
    mass = np.cumsum(values)
    return float(values[int(np.argmax(mass >= share * mass[-1]))])


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_rule_is_the_default(seed):
    maps = jnp.asarray(_smooth_maps(seed))
    np.testing.assert_array_equal(localize.boxes(maps, rule="paper"), localize.boxes(maps))
    np.testing.assert_array_equal(localize.boxes(maps, 0.35, rule="paper"), localize.boxes(maps, 0.35))


def test_resolution_threshold_values():
    # 7x7 EfficientNet-Lite0 maps at 224: 1 - 0.8 * 7 / 14 = 0.6; 14x14 or finer: the paper's 0.2.
    assert localize.resolution_threshold((7, 7)) == pytest.approx(0.6)
    assert localize.resolution_threshold((14, 14)) == pytest.approx(0.2)
    assert localize.resolution_threshold((16, 16)) == pytest.approx(0.2)
    assert localize.resolution_threshold((7, 10)) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="map_shape"):
        localize.boxes(jnp.ones((4, 4)), rule="resolution", map_shape=(0, 7))


@pytest.mark.parametrize("native", [(7, 7), (5, 9), (16, 16)])
def test_resolution_rule_matches_scipy(native):
    maps = _smooth_maps(0, count=12)
    got = np.asarray(localize.boxes(jnp.asarray(maps), rule="resolution", map_shape=native))
    t = _reference_resolution_threshold(*native)
    for m, box in zip(maps.astype(np.float64), got):
        assert box.tolist() == _reference_box(m >= t * m.max())


def test_otsu_rule_matches_skimage():
    maps = _smooth_maps(1, count=24)
    cuts = np.asarray(localize.rule_cuts(jnp.asarray(maps), "otsu"))
    got = np.asarray(localize.boxes(jnp.asarray(maps), rule="otsu"))
    for m, cut, box in zip(maps, cuts, got):
        reference = threshold_otsu(m.astype(np.float64))
        np.testing.assert_allclose(cut, reference, rtol=0, atol=1e-5 * (m.max() - m.min()))
        assert box.tolist() == _reference_box(m.astype(np.float64) > reference)


def test_otsu_rule_on_a_constant_map_is_the_whole_map():
    # scikit-image returns the constant itself: with ">= cut" every pixel is foreground.
    assert localize.boxes(jnp.full((5, 6), 0.3), rule="otsu").tolist() == [0, 0, 6, 5]
    assert float(threshold_otsu(np.full((5, 6), 0.3))) == pytest.approx(0.3)


@pytest.mark.parametrize("share", [0.3, 0.5, 0.9])
def test_energy_rule_matches_numpy(share):
    maps = _smooth_maps(2, count=12)
    got = np.asarray(localize.boxes(jnp.asarray(maps), rule="energy", energy_share=share))
    cuts = np.asarray(localize.rule_cuts(jnp.asarray(maps), "energy", energy_share=share))
    for m, cut, box in zip(maps, cuts, got):
        reference = _reference_energy_cut(m, share)
        assert cut == pytest.approx(reference, rel=1e-6)
        region = m.astype(np.float64) >= reference
        # The region holds at least the share of the positive mass; one pixel fewer would not.
        positive = np.maximum(m.astype(np.float64), 0)
        assert positive[region].sum() >= share * positive.sum() * (1 - 1e-6)
        assert box.tolist() == _reference_box(region)


def test_auto_rule_follows_the_native_resolution():
    maps = jnp.asarray(_smooth_maps(4))
    for native in [(7, 7), (16, 16), (14, 14)]:
        expected = localize.auto_rule(native)
        np.testing.assert_array_equal(
            localize.boxes(maps, rule="auto", map_shape=native), localize.boxes(maps, rule=expected, map_shape=native)
        )


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        ((7, 7), "energy"),  # EfficientNet-Lite0 at 224: the paper's rule overshoots on coarse maps
        ((7, 14), "energy"),  # the shorter side decides
        ((14, 14), "energy"),  # its atrous maps (and 448 inputs): energy won the development split there too
        ((15, 15), "paper"),
        ((16, 16), "paper"),  # the digits canvases: the paper's rule (0.951) stays for maps finer than 14x14
        ((28, 28), "paper"),
    ],
)
def test_auto_rule_is_pinned_by_map_resolution(native, expected):
    assert localize.auto_rule(native) == expected


@pytest.mark.parametrize("rule", localize.BOX_RULES)
def test_every_rule_is_batched(rule):
    maps = jnp.asarray(_smooth_maps(5, count=6)).reshape(2, 3, 24, 20)
    batched = np.asarray(localize.boxes(maps, rule=rule, map_shape=(7, 7)))
    assert batched.shape == (2, 3, 4)
    for index in np.ndindex(2, 3):
        np.testing.assert_array_equal(batched[index], localize.boxes(maps[index], rule=rule, map_shape=(7, 7)))


@pytest.mark.parametrize("rule", localize.BOX_RULES)
def test_no_positive_pixel_gives_a_flagged_empty_box(rule):
    maps = jnp.stack([jnp.zeros((6, 7)), -jnp.ones((6, 7)), jnp.full((6, 7), jnp.nan)])
    got = localize.boxes(maps, rule=rule)
    assert got.tolist() == [[0, 0, 0, 0]] * 3
    assert bool(jnp.all(localize.empty_boxes(got)))
    iou = localize.box_iou(got, jnp.array([1, 1, 4, 4]))
    assert not bool(jnp.any(jnp.isnan(iou))) and float(jnp.max(iou)) == 0.0


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid rules: paper, resolution, otsu, energy, auto"):
        localize.boxes(jnp.ones((4, 4)), rule="atrous")
    with pytest.raises(ValueError, match="energy_share"):
        localize.boxes(jnp.ones((4, 4)), rule="energy", energy_share=1.5)


def test_rules_are_jittable_with_the_rule_static():
    maps = jnp.asarray(_smooth_maps(6))
    for rule in localize.BOX_RULES:
        jitted = jax.jit(lambda m, rule=rule: localize.boxes(m, rule=rule, map_shape=(7, 7)))
        np.testing.assert_array_equal(jitted(maps), localize.boxes(maps, rule=rule, map_shape=(7, 7)))


# --- finer maps: the atrous option -------------------------------------------------------------


def _perturbed_variables(model, seed: int, scale: float = 0.02):
    """The model's initial variables with every parameter moved by ``scale`` times standard normal noise
    (one jitted program: eager noise per parameter shape would compile once per shape)."""
    variables = models.init_variables(model, (1, 64, 64, 3))

    @jax.jit
    def perturb(params, key):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(
            tree, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
        )

    return {"params": perturb(variables["params"], jax.random.key(seed)), "batch_stats": variables["batch_stats"]}


def _layer_output(model, variables, images, layer: str) -> jax.Array:
    """The output of submodule ``layer`` (one jitted forward pass)."""

    @jax.jit
    def run(variables, images):
        _, state = model.apply(
            variables, images, capture_intermediates=lambda m, _: m.name == layer, mutable=["intermediates"]
        )
        return state["intermediates"][layer]["__call__"][0]

    return run(variables, images)


def _small_efficientnet():
    """An EfficientNet-Lite with Lite0's stage kinds but few, narrow blocks: a strided stage of two blocks
    (the second dilated when atrous) followed by a stride-1 stage (dilated), as in Lite0's last stages."""
    from flaxcam.models.efficientnet import BlockArgs, EfficientNetLite

    blocks = (
        BlockArgs(1, 3, 1, 1, 8, 8),
        BlockArgs(1, 3, 2, 2, 8, 12),
        BlockArgs(2, 5, 2, 2, 12, 16),
        BlockArgs(1, 3, 1, 2, 16, 16),
    )
    return EfficientNetLite(num_classes=5, blocks_args=blocks, stem_features=8, head_features=24)


def _small_bottleneck_resnet():
    """A ResNet of ResNet-50's bottleneck blocks with one block per stage and two in the last (whose
    second block is dilated when atrous): the bottleneck path at a fraction of ResNet-50's cost."""
    from flaxcam.models.resnet import Bottleneck, ResNet

    return ResNet(stage_sizes=(1, 1, 1, 2), block_cls=Bottleneck, num_classes=5)


@pytest.mark.parametrize(
    ("name", "layer", "offset"),
    [
        ("small_efficientnet", "head", 1),  # EfficientNet-Lite0's stage kinds (MBConv, depthwise)
        ("resnet18", "layer4", 0),  # basic blocks
        ("small_bottleneck_resnet", "layer4", 0),  # ResNet-50's bottleneck blocks
    ],
)
def test_atrous_model_satisfies_the_a_trous_identity(name, layer, offset):
    """Atrous inference at stride 16 sampled every other pixel is the stride-32 model (same weights).
    The full EfficientNet-Lite0 and ResNet-50 are built from these same block classes; they were
    tested here too (92 and 83 s) and are left to the small models of the same kinds."""
    builders = {"small_efficientnet": _small_efficientnet, "small_bottleneck_resnet": _small_bottleneck_resnet}
    model = builders[name]() if name in builders else models.create_model(name, num_classes=5)
    variables = _perturbed_variables(model, seed=3)
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    coarse = _layer_output(model, variables, images, layer)
    fine = _layer_output(models.atrous(model), variables, images, layer)
    assert fine.shape[1:3] == (2 * coarse.shape[1], 2 * coarse.shape[2])
    scale = float(jnp.max(jnp.abs(coarse)))
    assert float(jnp.std(coarse)) > 0.05 * scale  # not a saturated, constant output
    sampled = fine[:, offset::2, offset::2]
    np.testing.assert_allclose(sampled, coarse, rtol=0, atol=1e-5 * scale)
    # The other phase is a different function of the input (the identity is not vacuous).
    other = fine[:, 1 - offset :: 2, 1 - offset :: 2]
    assert float(jnp.max(jnp.abs(other - coarse))) > 1e-3 * scale


def test_atrous_on_a_model_without_the_option_names_the_ones_that_have_it():
    with pytest.raises(ValueError, match="EfficientNetLite.*ResNet"):
        models.atrous(models.create_model("small_cnn", num_classes=3))
