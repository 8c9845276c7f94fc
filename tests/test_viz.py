"""flaxcam.colormap (on-device jet LUT, overlay) and flaxcam.viz (the seed figure)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from matplotlib.patches import Rectangle
from PIL import Image

from flaxcam import colormap, viz
from flaxcam.colormap import apply_colormap, jet_lut, overlay

JET = matplotlib.colormaps["jet"]
NAMES = ["melanoma", "nevus", "basal cell carcinoma", "actinic keratosis", "benign keratosis", "vascular"]


# ----------------------------------------------------------------------------------------------------
# colormap
# ----------------------------------------------------------------------------------------------------


def test_jet_lut_is_matplotlib_jet_and_cached():
    lut = jet_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.float32
    np.testing.assert_allclose(lut, JET(np.arange(256) / 255.0)[:, :3], atol=1e-7)
    assert jet_lut() is lut
    with pytest.raises(ValueError):
        lut[0, 0] = 1.0  # read-only: the cached table cannot be corrupted by a caller


def test_apply_colormap_matches_matplotlib_at_quantised_values():
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, size=(2, 3, 17, 23)).astype(np.float32)
    got = np.asarray(apply_colormap(jnp.asarray(maps)))
    assert got.shape == (2, 3, 17, 23, 3)
    quantised = np.clip(np.round(maps.astype(np.float64) * 255), 0, 255) / 255
    np.testing.assert_allclose(got, JET(quantised)[..., :3], atol=1e-6)
    # Against the unquantised values: matplotlib picks row floor(256 m), we pick round(255 m); the two
    # differ by at most one row, i.e. by at most jet's largest step between neighbouring rows (~0.018).
    step = np.abs(np.diff(jet_lut(), axis=0)).max()
    assert step < 0.02
    np.testing.assert_allclose(got, JET(maps)[..., :3], atol=step + 1e-6)


def test_apply_colormap_saturates_and_handles_nan():
    lut = jet_lut()
    maps = jnp.array([[-3.0, 0.0, 1.0, 7.0, jnp.nan]])
    got = np.asarray(apply_colormap(maps))[0]
    np.testing.assert_allclose(got, lut[[0, 0, 255, 255, 0]])


def test_apply_colormap_custom_lut_and_jit():
    lut = np.stack([np.linspace(0, 1, 11)] * 3, -1).astype(np.float32)  # 11-level grey ramp
    maps = jnp.array([[0.0, 0.04, 0.06, 0.5, 1.0]])
    got = np.asarray(jax.jit(apply_colormap)(maps, lut))
    np.testing.assert_allclose(got[0, :, 0], [0.0, 0.0, 0.1, 0.5, 1.0], atol=1e-6)


def test_overlay_formula():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, size=(4, 9, 13, 3)).astype(np.float32)
    maps = rng.uniform(0, 1, size=(4, 9, 13)).astype(np.float32)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        got = np.asarray(overlay(images, maps, alpha))
        colours = JET(np.round(maps.astype(np.float64) * 255) / 255)[..., :3]
        want = np.clip((1 - alpha) * images + alpha * colours, 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-6)
    # jitted with a traced alpha, and maps broadcast over leading image dimensions
    got = np.asarray(jax.jit(overlay)(images, maps[0], 0.25))
    np.testing.assert_allclose(got, np.asarray(overlay(images, np.broadcast_to(maps[0], maps.shape), 0.25)), atol=1e-6)
    # out-of-range images are clipped
    assert float(overlay(images + 5.0, maps, 0.5).max()) == 1.0


def test_overlay_uint8_images():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    maps = rng.uniform(size=(6, 7)).astype(np.float32)
    np.testing.assert_allclose(overlay(images, maps), overlay(images / 255.0, maps), atol=1e-6)


def test_overlay_shape_errors():
    images = jnp.zeros((2, 450, 600, 3))
    with pytest.raises(ValueError, match=r"\(2, 600, 450\).*\(2, 450, 600, 3\)"):
        overlay(images, jnp.zeros((2, 600, 450)))
    with pytest.raises(ValueError, match="images"):
        overlay(jnp.zeros((4, 4)), jnp.zeros((4, 4)))


# ----------------------------------------------------------------------------------------------------
# seed figure
# ----------------------------------------------------------------------------------------------------


def _inputs(h=450, w=600, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(h, w, 3)).astype(np.float32)
    preprocessed = (image - 0.45) / 0.22  # ImageNet-style: outside [0, 1]
    yy, xx = np.mgrid[:h, :w]
    cam = np.exp(-(((yy - 0.4 * h) / (0.15 * h)) ** 2 + ((xx - 0.6 * w) / (0.15 * w)) ** 2)).astype(np.float32)
    probs = np.array([0.05, 0.80, 0.02, 0.10, 0.01, 0.02])
    return image, preprocessed, cam, probs


def _bar_axes(fig):
    axes = [ax for ax in fig.axes if any(isinstance(c, BarContainer) for c in ax.containers)]
    assert len(axes) == 1
    return axes[0]


def _bars(fig):
    """[(class name, probability, facecolor)] of the bar plot, top to bottom."""
    ax = _bar_axes(fig)
    (container,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    bars = sorted(container.patches, key=lambda p: -p.get_y())
    return [(b.get_label(), b.get_width(), b.get_facecolor()) for b in bars]


def _axes_titled(fig, prefix):
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(prefix)]
    return ax


def test_seed_figure_layout_colours_and_box():
    image, pre, cam, probs = _inputs()
    over = overlay(jnp.asarray(image), jnp.asarray(cam))
    fig = viz.seed_figure(
        jnp.asarray(image),
        jnp.asarray(probs),
        NAMES,
        true_label=3,
        preprocessed=pre,
        overlay=over,
        box=jnp.array([300, 100, 480, 280], jnp.int32),
        title="Grad-CAM",
    )
    assert len(fig.axes) >= 4
    ax_a = _axes_titled(fig, "(a)")
    assert ax_a.get_xlabel() == "true: actinic keratosis (p=0.10)"
    _axes_titled(fig, "(b) preprocessed")
    ax_c = _axes_titled(fig, "(c)")
    assert ax_c.get_title() == "(c) Grad-CAM overlay"

    bars = _bars(fig)
    assert [(n, round(p, 2)) for n, p, _ in bars] == [("nevus", 0.8), ("actinic keratosis", 0.1), ("melanoma", 0.05)]
    green, red = to_rgba(viz.TRUE_COLOR), to_rgba(viz.OTHER_COLOR)
    assert [c for _, _, c in bars] == [red, green, red]
    assert green[1] > green[0] and red[0] > red[1]  # really green and really red

    rects = [p for p in ax_c.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(rects) == 1
    (x, y), w, h = rects[0].get_xy(), rects[0].get_width(), rects[0].get_height()
    assert (x, y, w, h) == (299.5, 99.5, 180, 180)  # exclusive end: covers pixel centres 300..479, 100..279
    assert not [p for p in ax_a.patches if isinstance(p, Rectangle) and not p.get_fill()]

    # Panels show the data: (b) min-max rescaled to [0, 1], (c) the overlay.
    (img_b,) = _axes_titled(fig, "(b)").get_images()
    data_b = np.asarray(img_b.get_array())
    assert data_b.min() == pytest.approx(0.0) and data_b.max() == pytest.approx(1.0)
    np.testing.assert_allclose(data_b, (pre - pre.min()) / (pre.max() - pre.min()), atol=1e-6)
    (img_c,) = ax_c.get_images()
    np.testing.assert_allclose(np.asarray(img_c.get_array()), np.asarray(over), atol=1e-6)


def test_seed_figure_draws_labelled_boxes_in_their_own_colours_with_a_legend():
    image, pre, cam, probs = _inputs()
    boxes = {"paper": [300, 100, 480, 280], "auto": [320, 120, 400, 200], "empty": [5, 5, 5, 9]}
    fig = viz.seed_figure(image, probs, NAMES, preprocessed=pre, overlay=cam, box=boxes)
    ax_c = _axes_titled(fig, "(c)")
    rects = [p for p in ax_c.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert [(r.get_label(), r.get_xy(), r.get_width()) for r in rects] == [
        ("paper", (299.5, 99.5), 180),
        ("auto", (319.5, 119.5), 80),
    ]  # the empty box is not drawn
    assert [r.get_edgecolor() for r in rects] == [to_rgba(c) for c in viz.BOX_COLORS[:2]]
    assert [t.get_text() for t in ax_c.get_legend().get_texts()] == ["paper", "auto"]
    with pytest.raises(ValueError, match="at most"):
        viz.seed_figure(image, probs, NAMES, overlay=cam, box={str(i): [0, 0, 4, 4] for i in range(5)})


def test_seed_figure_non_square_keeps_aspect(tmp_path):
    image, pre, cam, probs = _inputs(450, 600)
    fig = viz.seed_figure(
        image, probs, NAMES, true_label="nevus", preprocessed=pre, overlay=overlay(image, cam), box=[10, 20, 30, 40]
    )
    fig.canvas.draw()
    for prefix in ("(a)", "(b)", "(c)"):
        ax = _axes_titled(fig, prefix)
        extent = ax.get_window_extent()
        assert extent.height / extent.width == pytest.approx(450 / 600, rel=0.02)
        assert ax.get_images()[0].get_array().shape[:2] == (450, 600)
    path = viz.save_figure(fig, tmp_path / "nested" / "dir" / "seed.png")
    assert path.stat().st_size > 10_000
    with Image.open(path) as png:
        assert png.format == "PNG"
        w, h = png.size
        assert w > h > 200


def test_seed_figure_without_true_label_highlights_top1():
    image, pre, cam, probs = _inputs(64, 80)
    fig = viz.seed_figure(image, probs, NAMES, preprocessed=pre, overlay=overlay(image, cam))
    assert _axes_titled(fig, "(a)").get_xlabel() == "predicted: nevus (p=0.80)"
    assert _axes_titled(fig, "(c)").get_title() == "(c) CAM overlay"
    colours = [c for _, _, c in _bars(fig)]
    assert colours == [to_rgba(viz.TRUE_COLOR)] + [to_rgba(viz.OTHER_COLOR)] * 2


def test_seed_figure_true_label_outside_top3_and_name_lookup():
    image, _, _, probs = _inputs(32, 32)
    fig = viz.seed_figure(image, probs, NAMES, true_label="benign keratosis")
    assert _axes_titled(fig, "(a)").get_xlabel() == "true: benign keratosis (p=0.01)"
    assert [c for _, _, c in _bars(fig)] == [to_rgba(viz.OTHER_COLOR)] * 3
    # The same with the index.
    fig2 = viz.seed_figure(image, probs, NAMES, true_label=4)
    assert _axes_titled(fig2, "(a)").get_xlabel() == "true: benign keratosis (p=0.01)"


def test_seed_figure_raw_map_overlay_and_box_on_input():
    image, _, cam, probs = _inputs(90, 120)
    small = cam[::10, ::10] * 3.0  # low-resolution map, outside [0, 1]
    fig = viz.seed_figure(image, probs, NAMES, overlay=small, box=[1, 2, 5, 6])
    ax_c = _axes_titled(fig, "(c)")
    data = np.asarray(ax_c.get_images()[0].get_array())
    assert data.shape == (90, 120, 3) and data.min() >= 0.0 and data.max() <= 1.0
    assert any(isinstance(p, Rectangle) and not p.get_fill() for p in ax_c.patches)
    # No overlay: the box goes on the input image; an empty box is not drawn.
    fig2 = viz.seed_figure(image, probs, NAMES, box=[1, 2, 5, 6])
    assert any(isinstance(p, Rectangle) and not p.get_fill() for p in _axes_titled(fig2, "(a)").patches)
    fig3 = viz.seed_figure(image, probs, NAMES, overlay=small, box=[0, 0, 0, 0])
    assert not [p for p in _axes_titled(fig3, "(c)").patches if isinstance(p, Rectangle) and not p.get_fill()]


def test_seed_figure_few_classes_and_errors():
    image = np.zeros((8, 8, 3), np.uint8)
    fig = viz.seed_figure(image, [0.3, 0.7], ["a", "b"], true_label=0)
    assert [n for n, _, _ in _bars(fig)] == ["b", "a"]
    with pytest.raises(ValueError, match="class names"):
        viz.seed_figure(image, [0.3, 0.7], ["a", "b", "c"])
    with pytest.raises(ValueError, match="true_label"):
        viz.seed_figure(image, [0.3, 0.7], ["a", "b"], true_label="c")
    with pytest.raises(ValueError, match="box"):
        viz.seed_figure(image, [0.3, 0.7], ["a", "b"], overlay=np.zeros((8, 8, 3)), box=[1, 2, 3])


def test_viz_leaves_pyplot_and_backend_alone():
    import sys

    backend = matplotlib.get_backend()
    image, _, _, probs = _inputs(16, 16)
    viz.seed_figure(image, probs, NAMES)
    assert matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in sys.modules or sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_colormap_module_exports():
    assert set(colormap.__all__) >= {"apply_colormap", "jet_lut", "overlay"}


# ----------------------------------------------------------------------------------------------------
# method grid
# ----------------------------------------------------------------------------------------------------


def test_method_grid_layout_titles_and_labels():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 45, 3), dtype=np.uint8), rng.uniform(0, 1, (60, 90, 3)).astype(np.float32)]
    maps = {
        "cam": rng.uniform(0, 1, (2, 7, 7)),
        "gradcam": rng.uniform(-3, 5, (2, 7, 7)),  # outside [0, 1]: min-max normalized
        "fem": rng.uniform(0, 1, (2, 14, 14)),
    }
    fig = viz.method_grid(
        images,
        maps,
        row_labels=["cat (0.80)", "cup (0.86)"],
        seconds_per_image={"cam": 0.0123, "gradcam": None, "fem": 0.00042},
        titles={"fem": "FEM (k=2)"},
    )
    axes = fig.get_axes()
    assert len(axes) == 2 * (1 + 3)  # rows x (input + one column per method)
    assert [ax.get_title() for ax in axes[:4]] == ["input", "CAM\n12 ms/image", "Grad-CAM", "FEM (k=2)\n0.42 ms/image"]
    assert axes[0].get_ylabel() == "cat (0.80)" and axes[4].get_ylabel() == "cup (0.86)"
    # every cell shows its row's image size; the overlays are RGB in [0, 1]
    for ax in axes[4:]:
        shown = np.asarray(ax.get_images()[0].get_array())
        assert shown.shape[:2] == (60, 90)
    overlay = np.asarray(axes[5].get_images()[0].get_array())
    assert overlay.shape == (60, 90, 3) and overlay.min() >= 0.0 and overlay.max() <= 1.0
    width, height = fig.get_size_inches()
    assert width > 2.5 * height  # four 3:2 panels per row, two rows
    fig.canvas.draw()  # the layout engine accepts it


def test_method_grid_and_method_maps_name_the_valid_methods():
    maps = {"gradcam": np.zeros((1, 4, 4)), "nope": np.zeros((1, 4, 4))}
    with pytest.raises(ValueError, match=r"unknown method 'nope'; valid methods: .*\bcam\b.*\bgradcam\b"):
        viz.method_grid([np.zeros((8, 8, 3))], maps)
    with pytest.raises(ValueError, match=r"unknown methods 'x', 'y'; valid methods: "):
        viz.method_maps(None, None, np.zeros((1, 8, 8, 3), np.float32), methods=["x", "gradcam", "y"])
    with pytest.raises(ValueError, match=r"must have shape \(2, h, w\) for 2 images"):
        viz.method_grid([np.zeros((8, 8, 3))] * 2, {"cam": np.zeros((1, 4, 4))})
    with pytest.raises(ValueError, match=r"seconds_per_image names methods that are not in maps: \['fem'\]"):
        viz.method_grid([np.zeros((8, 8, 3))], {"cam": np.zeros((1, 4, 4))}, seconds_per_image={"fem": 1.0})


def test_method_maps_equal_explain_one_call_per_method():
    import flaxcam
    from flaxcam.models.small import small_cnn

    model = small_cnn(4, (4, 8))
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    variables = model.init(jax.random.key(1), images)
    result = viz.method_maps(model, variables, images, methods=("cam", "gradcam"), timed=False)
    assert list(result.maps) == ["cam", "gradcam"] and result.seconds_per_image == {"cam": None, "gradcam": None}
    for name, maps in result.maps.items():
        assert maps.shape == (3, 16, 16)
        np.testing.assert_allclose(maps, np.asarray(flaxcam.explain(model, variables, images, method=name).maps[:, 0]))
    probabilities = np.asarray(jax.nn.softmax(model.apply(variables, images)))
    np.testing.assert_array_equal(result.targets, probabilities.argmax(1))
    np.testing.assert_allclose(result.probabilities, probabilities.max(1), rtol=1e-5)
