"""The seed figure (input with top-3 predictions, preprocessed input, CAM overlay with its box) and the
method-comparison grid (:func:`method_maps`, :func:`method_grid`).

The layout follows the skin-lesion CAM material the project reproduces:

* (a) left column — the input image, captioned ``"true: <name> (p=0.93)"`` (``"predicted: ..."`` without a
  true label), and below it a horizontal bar plot of the three most probable classes, the true class's
  bar green and the others red (without a true label the top-1 bar is green);
* (b) middle — the preprocessed image (min-max rescaled for display when it leaves [0, 1]);
* (c) right — the CAM overlay, optionally with the localization box of :func:`flaxcam.localize.boxes`.

Matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas directly: no pyplot, no
global backend switch, so it is safe in servers, notebooks and threads.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.patches import Rectangle

__all__ = [
    "BOX_COLOR",
    "BOX_COLORS",
    "GRID_METHODS",
    "METHOD_TITLES",
    "OTHER_COLOR",
    "TRUE_COLOR",
    "MethodMaps",
    "check_methods",
    "method_grid",
    "method_maps",
    "save_figure",
    "seed_figure",
]

#: Bar colour of the true class (or of the top-1 class when no true label is given).
TRUE_COLOR = "#2ca02c"
#: Bar colour of the other classes.
OTHER_COLOR = "#d62728"
#: Outline colour of the localization box.
BOX_COLOR = "white"
#: Outline colours when several boxes are drawn (one per box rule, in order), the first :data:`BOX_COLOR`.
BOX_COLORS = (BOX_COLOR, "#00e5ff", "#ff4fd8", "#ffd400")

_TOP_K = 3


def _as_display_image(array, name: str) -> np.ndarray:
    """numpy/jax image → (H, W) or (H, W, 3|4) numpy array that imshow shows as intended."""
    img = np.asarray(array)
    while img.ndim > 3 and img.shape[0] == 1:  # a batch of one
        img = img[0]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise ValueError(f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.dtype == np.uint8:
        return img
    if img.dtype == bool or np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / (1.0 if img.dtype == bool else 255.0)
    img = np.asarray(img, np.float32)
    finite = np.isfinite(img)
    if not finite.all():
        img = np.where(finite, img, 0.0)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:  # e.g. ImageNet-normalized input: min-max rescale for display
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img


def _class_index(true_label, class_names: Sequence[str]) -> int:
    if isinstance(true_label, str):
        try:
            return list(class_names).index(true_label)
        except ValueError:
            raise ValueError(f"true_label {true_label!r} is not one of the class names {list(class_names)}") from None
    index = int(np.asarray(true_label))
    if not 0 <= index < len(class_names):
        raise ValueError(f"true_label index {index} out of range for {len(class_names)} classes")
    return index


def _show(ax, img: np.ndarray) -> None:
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else 1, aspect="equal")
    else:
        ax.imshow(img, aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw_box(ax, box, color: str = BOX_COLOR, label: str = "box") -> Rectangle | None:
    box = np.asarray(box).reshape(-1)
    if box.shape != (4,):
        raise ValueError(f"box must be [x0, y0, x1, y1], got shape {box.shape}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:  # empty box (nothing salient): nothing to draw
        return None
    # Pixel (x, y) covers [x - 0.5, x + 0.5] in imshow's data coordinates; the end is exclusive.
    rect = Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=2.0, label=label)
    from matplotlib import patheffects

    rect.set_path_effects([patheffects.withStroke(linewidth=3.5, foreground="black", alpha=0.6)])
    ax.add_patch(rect)
    return rect


def _draw_boxes(ax, box) -> None:
    """One box, or a mapping ``{label: box}`` drawn in :data:`BOX_COLORS` order with a legend."""
    if not isinstance(box, Mapping):
        _draw_box(ax, box)
        return
    if len(box) > len(BOX_COLORS):
        raise ValueError(f"at most {len(BOX_COLORS)} labelled boxes can be drawn, got {len(box)}")
    drawn = [_draw_box(ax, b, color, str(label)) for (label, b), color in zip(box.items(), BOX_COLORS)]
    handles = [rect for rect in drawn if rect is not None]
    if handles:
        legend = ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.75, facecolor="#303030")
        for text in legend.get_texts():
            text.set_color("white")


def _overlay_from_map(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W) map → jet overlay on ``image`` (resized to the image and min-max normalized as needed)."""
    import jax.numpy as jnp

    from flaxcam import colormap, ops

    base = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=-1)
    base = base[..., :3]
    heat = jnp.asarray(np.nan_to_num(np.asarray(cam, np.float32)))
    if heat.shape != base.shape[:2]:
        heat = ops.resize_maps(heat, base.shape[:2])
    if float(heat.min()) < 0.0 or float(heat.max()) > 1.0:
        heat = ops.minmax_normalize(heat)
    return np.asarray(colormap.overlay(jnp.asarray(base), heat))


def seed_figure(
    image,
    probabilities,
    class_names: Sequence[str],
    *,
    true_label: int | str | None = None,
    preprocessed=None,
    overlay=None,
    box=None,
    title: str | None = None,
) -> Figure:
    """Build the seed figure in one call and return it (an Agg-backed :class:`~matplotlib.figure.Figure`).

    Args:
        image: the input image, ``(H, W, 3)`` (or ``(H, W)``), numpy or jax; float in [0, 1] or uint8.
        probabilities: ``(K,)`` class probabilities (numpy or jax).
        class_names: ``K`` class names.
        true_label: the true class, as an index or a name. The caption then reads
            ``"true: <name> (p=<probability of the true class>)"`` and the true class's bar is green (if the
            true class is not among the top 3, all three bars are red). Without it the caption reads
            ``"predicted: <top-1 name> (p=<top-1 probability>)"`` and the top-1 bar is green.
        preprocessed: the model's input, ``(H', W', 3)``; shown min-max rescaled when outside [0, 1].
            Omitted → no panel (b).
        overlay: the CAM overlay, an RGB ``(H, W, 3)`` image (e.g. :func:`flaxcam.colormap.overlay`), or a
            raw ``(h, w)`` map that is then resized to the image, min-max normalized if outside [0, 1] and
            overlaid with the jet colormap. Omitted → no panel (c).
        box: ``[x0, y0, x1, y1]`` in the overlay's pixel coordinates with an exclusive end (the convention of
            :func:`flaxcam.localize.boxes`), drawn as a rectangle outline on the overlay (on the input image
            when there is no overlay). An empty box (``x1 <= x0`` or ``y1 <= y0``) is not drawn. A mapping
            ``{label: box}`` (e.g. one box per box rule, ``{"paper": ..., "auto": ...}``) draws each in its
            own colour (:data:`BOX_COLORS`) with a legend.
        title: the method's name for panel (c), e.g. ``"Grad-CAM"`` → ``"(c) Grad-CAM overlay"``
            (default ``"(c) CAM overlay"``).

    Images keep their aspect ratio (``imshow(aspect="equal")``), so non-square inputs such as 450x600 show
    undistorted.
    """
    img = _as_display_image(image, "image")
    probs = np.asarray(probabilities, np.float64).reshape(-1)
    names = [str(n) for n in class_names]
    if probs.shape[0] != len(names):
        raise ValueError(f"{probs.shape[0]} probabilities but {len(names)} class names")
    if probs.shape[0] == 0:
        raise ValueError("probabilities must not be empty")

    order = np.argsort(-probs, kind="stable")
    top = order[: min(_TOP_K, len(names))]
    if true_label is not None:
        highlight = _class_index(true_label, names)
        caption = f"true: {names[highlight]} (p={probs[highlight]:.2f})"
    else:
        highlight = int(order[0])
        caption = f"predicted: {names[highlight]} (p={probs[highlight]:.2f})"

    panels = []
    if preprocessed is not None:
        panels.append(("(b) preprocessed", _as_display_image(preprocessed, "preprocessed"), None))
    over = None
    if overlay is not None:
        over = np.asarray(overlay)
        over = _overlay_from_map(img, over) if over.ndim == 2 else _as_display_image(over, "overlay")
        panels.append((f"(c) {title or 'CAM'} overlay", over, box))

    # Size the figure after the image aspect so non-square images fill their panels.
    height, width = img.shape[:2]
    aspect = height / width
    panel_w = 4.0
    image_h = panel_w * aspect
    bar_h = 0.3 * len(top) + 0.5
    ncols = 1 + len(panels)
    fig = Figure(figsize=(panel_w * ncols + 1.2, image_h + bar_h + 1.5), layout="constrained")
    cast(ConstrainedLayoutEngine, fig.get_layout_engine()).set(w_pad=0.06, wspace=0.03)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, ncols, height_ratios=[image_h, bar_h])

    ax_img = fig.add_subplot(grid[0, 0])
    _show(ax_img, img)
    ax_img.set_title("(a) input")
    ax_img.set_xlabel(caption, fontsize=11)
    if over is None and box is not None:
        _draw_boxes(ax_img, box)

    ax_bar = fig.add_subplot(grid[1, 0])
    ypos = np.arange(len(top))[::-1]
    colours = [TRUE_COLOR if int(k) == highlight else OTHER_COLOR for k in top]
    bars = ax_bar.barh(ypos, probs[top], color=colours, height=0.6)
    for bar, k in zip(bars, top):
        bar.set_label(names[k])
    ax_bar.set_yticks(ypos, [names[k] for k in top])
    ax_bar.set_xlim(0, 1.18)
    ax_bar.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax_bar.tick_params(axis="x", labelsize=8)
    ax_bar.set_xlabel(f"top-{len(top)} probabilities", fontsize=9)
    for spine in ("top", "right"):
        ax_bar.spines[spine].set_visible(False)
    for bar, p in zip(bars, probs[top]):
        ax_bar.text(bar.get_width() + 0.02, bar.get_y() + bar.get_height() / 2, f"{p:.2f}", va="center", fontsize=9)

    for col, (panel_title, panel_img, panel_box) in enumerate(panels, start=1):
        ax = fig.add_subplot(grid[0, col])  # in line with (a); the bar plot row stays under (a) only
        _show(ax, panel_img)
        ax.set_title(panel_title)
        if panel_box is not None:
            _draw_boxes(ax, panel_box)
    return fig


def save_figure(fig: Figure, path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (parent directories created), close it and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or not hasattr(fig.canvas, "print_figure"):
        FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=max(fig.dpi, 100))
    # A figure built here has no pyplot manager; one made with pyplot is released from pyplot's registry.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return path


def factorization_overlay(image, heatmaps, colors: np.ndarray | None = None, image_weight: float = 0.5) -> np.ndarray:
    """Deep Feature Factorization's concept image (pytorch-grad-cam's ``show_factorization_on_image``):
    each pixel takes the colour of its strongest concept, as bright as that concept's heatmap value,
    blended with the image. ``image`` ``(H, W, 3)`` (uint8 or [0, 1]); ``heatmaps`` ``(k, H, W)`` in
    [0, 1] (``Concepts.heatmaps[b]``); ``colors`` ``(k, 3)`` in [0, 1] (default: matplotlib's
    ``gist_rainbow`` at ``i / k``, as the reference). Returns ``(H, W, 3)`` uint8."""
    from matplotlib import colormaps

    base = _as_display_image(image, "image").astype(np.float32)
    base = base / 255.0 if base.max() > 1.0 else base
    heatmaps = np.clip(np.asarray(heatmaps, np.float32), 0.0, 1.0)
    count = heatmaps.shape[0]
    if colors is None:
        colors = np.asarray([colormaps["gist_rainbow"](i / count)[:3] for i in range(count)], np.float32)
    strongest = heatmaps.argmax(axis=0)
    # a colour at HSV brightness v: the colour scaled so that its largest component is v
    unit = np.asarray(colors, np.float32) / np.maximum(np.asarray(colors, np.float32).max(axis=1, keepdims=True), 1e-8)
    value = np.take_along_axis(heatmaps, strongest[None], axis=0)[0]
    mask = unit[strongest] * value[..., None]
    return (np.clip(base[..., :3] * image_weight + mask * (1 - image_weight), 0, 1) * 255).astype(np.uint8)


def factorization_figure(
    image, concepts, index: int = 0, labels: Sequence[str] | None = None, top_k: int = 2
) -> Figure:
    """The concept figure of image ``index`` of a :func:`flaxcam.dff.deep_feature_factorization`
    result: the image, its :func:`factorization_overlay` and, per concept, its heatmap, titled with
    the head's top ``top_k`` classes for that concept (softmax over the concept's scores) when the
    factorization was scored by a head."""
    heatmaps = np.asarray(concepts.heatmaps[index])
    count = heatmaps.shape[0]
    figure = Figure(figsize=(2.4 * (count + 2), 2.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, count + 2)
    _show(axes[0], _as_display_image(image, "image"))
    axes[0].set_title("image")
    _show(axes[1], factorization_overlay(image, heatmaps))
    axes[1].set_title("concepts")
    scores = None if concepts.scores is None else np.asarray(concepts.scores, np.float64)
    for j in range(count):
        axes[j + 2].imshow(heatmaps[j], cmap="viridis", vmin=0, vmax=1)
        axes[j + 2].axis("off")
        title = f"concept {j}"
        if scores is not None:
            probabilities = np.exp(scores[j] - scores[j].max())
            probabilities /= probabilities.sum()
            best = np.argsort(-probabilities)[:top_k]
            title += "\n" + "\n".join(f"{labels[c] if labels is not None else c}: {probabilities[c]:.2f}" for c in best)
        axes[j + 2].set_title(title, fontsize=8)
    return figure


def volume_figure(volume, cam, slices: int = 4, axis: int = 0, title: str | None = None) -> Figure:
    """A volume and its map as ``slices`` evenly spaced slices along ``axis`` (0: depth): the slice of
    the volume on top, with the map overlaid below. ``volume`` ``(D, H, W)`` or ``(D, H, W, C)`` (the
    first channel is shown), ``cam`` ``(D, H, W)`` in [0, 1] (``Explanation.maps[b, t]`` of a 3-D
    network)."""
    volume = np.asarray(volume, np.float32)
    volume = volume[..., 0] if volume.ndim == 4 else volume
    cam = np.asarray(cam, np.float32)
    if volume.shape != cam.shape:
        raise ValueError(f"volume {volume.shape} and map {cam.shape} must have the same (D, H, W) shape")
    indices = np.linspace(0, volume.shape[axis] - 1, slices).round().astype(int)
    low, high = float(volume.min()), float(volume.max())
    gray = (volume - low) / (high - low + 1e-12)
    figure = Figure(figsize=(2.2 * slices, 4.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, slices, squeeze=False)
    for column, index in enumerate(indices):
        image_slice = np.take(gray, index, axis=axis)
        _show(axes[0, column], image_slice)
        axes[0, column].set_title(f"slice {index}", fontsize=8)
        _show(
            axes[1, column],
            _overlay_from_map(np.repeat(image_slice[..., None], 3, axis=-1), np.take(cam, index, axis=axis)),
        )
    if title:
        figure.suptitle(title)
    return figure


#: The methods of the comparison grid by default: the main families (CAM, gradient-weighted, score-based,
#: gradient-free), each cheap enough to run on a CPU in seconds. ``faster_scorecam`` stands for Score-CAM,
#: whose full form costs one forward pass per channel (1280 for EfficientNet-Lite0's ``head``).
GRID_METHODS = ("cam", "gradcam", "gradcam++", "layercam", "faster_scorecam", "eigencam", "fem")

#: Column titles of the grid (names as the papers write them); other methods show their registry name.
METHOD_TITLES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "scorecam": "Score-CAM",
    "faster_scorecam": "Faster Score-CAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGrad-CAM",
    "fem": "FEM",
    "ablationcam": "Ablation-CAM",
    "shapleycam": "ShapleyCAM",
    "fullgrad": "FullGrad",
    "randomcam": "Random",
}


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names as a list; an unknown one raises a ValueError naming the valid ones (sorted)."""
    from flaxcam.methods import METHODS

    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise ValueError("no methods given")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid methods: {', '.join(sorted(METHODS))}"
        )
    return names


class MethodMaps(NamedTuple):
    """What :func:`method_maps` returns, one entry per method (in the order asked)."""

    #: ``(B, H, W)`` maps in [0, 1] at the input's resolution, for each image's target (its top class).
    maps: dict[str, np.ndarray]
    #: seconds per image of a second, already compiled call over the whole batch (None: not timed).
    seconds_per_image: dict[str, float | None]
    #: seconds of the first call (compilation included), for the whole batch.
    first_call_seconds: dict[str, float]
    #: ``(B,)`` the class explained in each image (by the first method's call).
    targets: np.ndarray
    #: ``(B,)`` the model's probability of that class.
    probabilities: np.ndarray


def method_maps(
    model: Any,
    *args: Any,
    methods: Sequence[str] = GRID_METHODS,
    timed: bool = True,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    **explain_kwargs: Any,
) -> MethodMaps:
    """The maps of several methods for one batch: one :func:`flaxcam.explain` call per method, each over
    the whole batch.

    ``method_maps(linen_model, variables, images, ...)`` or ``method_maps(nnx_model, images, ...)``, as
    :func:`flaxcam.explain`. Every name is checked against :data:`flaxcam.METHODS` before anything runs
    (a ValueError names the valid ones). ``timed``: call each method a second time, once compiled, and
    report its seconds per image. ``method_options``: options per method, e.g.
    ``{"faster_scorecam": {"top_channels": 32}}``. Other keyword arguments (``layer``, ``targets``, ...)
    go to every :func:`flaxcam.explain` call; the map of each image's first target is kept.
    """
    import jax

    import flaxcam

    names = check_methods(methods)
    options = dict(method_options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"method_options for methods not asked for: {stray}; methods: {names}")
    maps: dict[str, np.ndarray] = {}
    seconds: dict[str, float | None] = {}
    first: dict[str, float] = {}
    for name in names:

        def run(name: str = name) -> Any:
            out = flaxcam.explain(model, *args, method=name, method_options=options.get(name), **explain_kwargs)
            return jax.block_until_ready(out)

        start = time.perf_counter()
        out = run()
        first[name] = time.perf_counter() - start
        seconds[name] = None
        if timed:
            start = time.perf_counter()
            out = run()
            seconds[name] = (time.perf_counter() - start) / out.maps.shape[0]
        maps[name] = np.asarray(out.maps[:, 0])
        if name == names[0]:
            targets = np.asarray(out.targets[:, 0])
            probabilities = np.take_along_axis(np.asarray(out.probabilities), targets[:, None], axis=1)[:, 0]
    return MethodMaps(maps, seconds, first, targets, probabilities)


def method_grid(
    images: Sequence[Any],
    maps: Mapping[str, Any],
    *,
    row_labels: Sequence[str] | None = None,
    seconds_per_image: Mapping[str, float | None] | None = None,
    titles: Mapping[str, str] | None = None,
    alpha: float = 0.5,
    panel_height: float = 1.5,
    title: str | None = None,
) -> Figure:
    """A method-comparison grid: one row per image (the image first), one column per method, each map in
    the jet colormap over the image.

    Args:
        images: ``B`` display images, ``(H, W, 3)`` uint8 or floats in [0, 1], each of any size (e.g. the
            original photos: a map is resized to its image, so a photo squashed to the model's input
            size shows at its true aspect).
        maps: method name → ``(B, h, w)`` maps (e.g. :attr:`MethodMaps.maps`), min-max normalized per map
            when outside [0, 1]. Names must be in :data:`flaxcam.METHODS` (a ValueError names the valid
            ones); a column's title is :data:`METHOD_TITLES` of its name.
        row_labels: ``B`` labels written under the images (e.g. the predicted class).
        seconds_per_image: method name → seconds per image, written under the column's title in ms.
        titles: method name → column title, instead of :data:`METHOD_TITLES` (e.g. to name an option).
        alpha: weight of the heat map in the overlay.
        panel_height: height of a row in inches (the width follows the first image's aspect).
        title: a title above the grid.
    """
    from PIL import Image as PILImage

    from flaxcam import colormap
    from flaxcam.ops import NORMALIZE_EPS

    names = check_methods(list(maps))
    shown = [_as_display_image(image, f"images[{b}]") for b, image in enumerate(images)]
    rows = len(shown)
    if rows == 0:
        raise ValueError("no images given")
    stacks = {name: np.asarray(maps[name], np.float32) for name in names}
    for name, stack in stacks.items():
        if stack.ndim != 3 or stack.shape[0] != rows:
            raise ValueError(f"maps[{name!r}] must have shape ({rows}, h, w) for {rows} images, got {stack.shape}")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} images")
    for option in ("seconds_per_image", "titles"):
        given = {"seconds_per_image": seconds_per_image, "titles": titles}[option] or {}
        stray = sorted(set(given) - set(names))
        if stray:
            raise ValueError(f"{option} names methods that are not in maps: {stray}; maps has {names}")

    height, width = shown[0].shape[:2]
    panel_width = panel_height * width / height
    columns = 1 + len(names)
    header = 0.55 if seconds_per_image else 0.35
    fig = Figure(
        figsize=(
            panel_width * columns + (0.3 if row_labels is not None else 0.1),
            panel_height * rows + header + (0.3 if title else 0.0),
        ),
        layout="constrained",
    )
    cast(ConstrainedLayoutEngine, fig.get_layout_engine()).set(w_pad=0.01, h_pad=0.01, wspace=0.01, hspace=0.01)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    lut = colormap.jet_lut()
    for row, image in enumerate(shown):
        base = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        base = np.repeat(base[..., None], 3, axis=-1) if base.ndim == 2 else base[..., :3]
        overlays = []
        for name in names:  # NumPy and Pillow: no small XLA programs compiled per image size
            heat = np.nan_to_num(stacks[name][row])
            if heat.min() < 0.0 or heat.max() > 1.0:
                heat = (heat - heat.min()) / (NORMALIZE_EPS + (heat - heat.min()).max())
            if heat.shape != base.shape[:2]:
                resized = PILImage.fromarray(heat.astype(np.float32)).resize(
                    base.shape[1::-1], PILImage.Resampling.BILINEAR
                )
                heat = np.asarray(resized)
            colours = lut[np.clip(np.round(heat * 255), 0, 255).astype(np.int32)]
            overlays.append(np.clip((1 - alpha) * base + alpha * colours, 0.0, 1.0))
        _show(axes[row, 0], image)
        if row_labels is not None:
            axes[row, 0].set_ylabel(str(row_labels[row]), fontsize=8)
        for column in range(1, columns):
            _show(axes[row, column], overlays[column - 1])
    axes[0, 0].set_title("input", fontsize=9)
    for column, name in enumerate(names, start=1):
        heading = (titles or {}).get(name, METHOD_TITLES.get(name, name))
        value = None if seconds_per_image is None else seconds_per_image.get(name)
        if value is not None:
            heading += f"\n{value * 1e3:.0f} ms/image" if value >= 1e-3 else f"\n{value * 1e3:.2f} ms/image"
        axes[0, column].set_title(heading, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
