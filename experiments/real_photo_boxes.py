"""Real-photo localization benchmark: box rules and finer maps for the pretrained EfficientNet-Lite0.

The benchmark is generated offline from the photos that ship with scikit-image and scikit-learn, with the
seed in ``configs/real_photo_boxes.json`` (nothing is downloaded, no image is committed):

* **pasted objects** (``count`` images, ``size`` x ``size``): an object cut from a photo (the crop boxes
  in the config, annotated by hand: the cat of ``chelsea``, the cup and saucer of ``coffee``, the rocket
  of ``rocket``, the motorcycle of ``stereo_motorcycle``, the palace of ``china.jpg``), randomly flipped,
  its longer side scaled to 20–70% of the image side, pasted at a uniformly random position on a random
  crop of one of scikit-image's textures (``brick``, ``grass``, ``gravel``; grey, randomly tinted). The
  ground-truth box is the pasted rectangle. Kinds go round-robin (image ``i`` has kind ``i % 5``); even
  images form the **development** split, odd ones the **held-out** split.
* **whole photos**: the five photos with the objects' boxes annotated by hand in the config.

Each image is explained with CAM for the model's top-1 class (CAM = Grad-CAM at this layer up to a
positive factor, so both give the same boxes), an object is **correctly classified** when the top-1 class
is one of its kind's acceptable ImageNet classes (config). Reported per map source and box rule, per kind
and split: acceptable top-1 rate, pointing game, box IoU >= 0.5 and mean IoU (over correctly classified
objects, and over all images), and time per image.

Map sources: ``cam@224`` (the default: 7x7 maps), ``cam@448`` (test-time upscaling: 14x14 maps),
``cam_atrous@224`` (:func:`flaxcam.models.atrous`: 14x14 maps, same weights) and ``layercam_fusion8``
(LayerCAM at ``head``, ``_blocks.10``, ``_blocks.4``: stride 32 + 16 + 8, fused by :func:`flaxcam.explain`;
``resolution`` and ``auto`` read the finest layer's 28x28).

Box rules: :data:`flaxcam.localize.BOX_RULES` plus, as a diagnosis, fixed fractions of the maximum and
energy shares. The ``auto`` rule's choice is checked against the development split (``dev_choice``).

The digits canvases: ``--digits RUN`` reads a digits probe's saved CAM maps and bundle
(``python -m experiments.digits_localization_probe`` with ``configs/digits_localization.json``'s settings)
and scores the same rules on its 1,000 test canvases.

    python -m experiments.real_photo_boxes [--smoke] [--out DIR] [--digits RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

import flaxcam
from experiments import common
from flaxcam import localize, metrics, models

KINDS_ORDER = ("cat", "cup", "rocket", "motorcycle", "building")


@dataclass(frozen=True)
class Benchmark:
    """Images ``(N, S, S, 3)`` uint8, boxes ``(N, 4)`` ``[x0, y0, x1, y1]`` (exclusive end), kind index
    ``(N,)``, held-out flag ``(N,)``."""

    images: np.ndarray
    boxes: np.ndarray
    kinds: np.ndarray
    held_out: np.ndarray


def source_photos() -> dict[str, np.ndarray]:
    """The RGB photos the objects are cut from (scikit-image, scikit-learn; offline)."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "china": load_sample_image("china.jpg"),
    }


def textures(names: list[str]) -> list[np.ndarray]:
    """scikit-image's grey textures, 512x512 uint8."""
    from skimage import data

    return [getattr(data, name)() for name in names]


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def make_benchmark(config: dict[str, Any]) -> Benchmark:
    """The pasted-object images of ``config`` (deterministic in ``config["seed"]``)."""
    rng = np.random.default_rng(config["seed"])
    size = config["size"]
    photos = source_photos()
    objects = [config["objects"][kind] for kind in KINDS_ORDER]
    crops = [photos[o["photo"]][o["box"][1] : o["box"][3], o["box"][0] : o["box"][2]] for o in objects]
    backgrounds = textures(config["textures"])
    low, high = config["scale"]
    images, boxes, kinds = [], [], []
    for index in range(config["count"]):
        kind = index % len(KINDS_ORDER)
        texture = backgrounds[rng.integers(len(backgrounds))]
        side = int(rng.integers(size // 2, texture.shape[0] + 1))
        top, left = rng.integers(0, texture.shape[0] - side + 1), rng.integers(0, texture.shape[1] - side + 1)
        grey = _resize(texture[top : top + side, left : left + side], size, size).astype(np.float32)
        tint = rng.uniform(0.75, 1.15, size=3).astype(np.float32)
        canvas = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
        crop = crops[kind][:, ::-1] if rng.random() < 0.5 else crops[kind]
        longer = rng.uniform(low, high) * size
        scale = longer / max(crop.shape[:2])
        height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
        y0, x0 = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
        canvas[y0 : y0 + height, x0 : x0 + width] = _resize(np.ascontiguousarray(crop), width, height)
        images.append(canvas)
        boxes.append([x0, y0, x0 + width, y0 + height])
        kinds.append(kind)
    kinds_array = np.asarray(kinds, np.int32)
    return Benchmark(np.stack(images), np.asarray(boxes, np.int32), kinds_array, np.arange(config["count"]) % 2 == 1)


def whole_photos(config: dict[str, Any]) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """The hand-annotated whole photos: names, images, boxes, kind index."""
    photos = source_photos()
    entries = {k: v for k, v in config["whole_photos"].items() if not k.startswith("_")}
    names = list(entries)
    return (
        names,
        [photos[n] for n in names],
        np.asarray([entries[n]["box"] for n in names], np.float32),
        np.asarray([KINDS_ORDER.index(entries[n]["kind"]) for n in names], np.int32),
    )


# --- maps ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapSource:
    name: str
    input_size: int
    method: str
    layer: tuple[str, ...] | None
    atrous: bool = False


MAP_SOURCES = (
    MapSource("cam@224", 224, "cam", None),
    MapSource("cam@448", 448, "cam", None),
    MapSource("cam_atrous@224", 224, "cam", None, atrous=True),
    MapSource("layercam_fusion8@224", 224, "layercam", ("head", "_blocks.10", "_blocks.4")),
)


def model_inputs(images: list[np.ndarray] | np.ndarray, size: int, meta: dict[str, Any]) -> np.ndarray:
    """Resize (bilinear) to ``size`` x ``size`` and normalize as the pretrained model expects."""
    resized = np.stack([_resize(np.asarray(im), size, size) for im in images]).astype(np.float32) / 255.0
    return ((resized - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)).astype(np.float32)


def explain_source(model, variables, inputs: np.ndarray, source: MapSource, batch: int) -> dict[str, Any]:
    """Maps ``(N, S, S)``, native map shape, logits and seconds per image (after the first batch compiled)."""
    net = models.atrous(model) if source.atrous else model
    maps, logits, seconds = [], [], []
    native = None
    for start in range(0, len(inputs), batch):
        began = time.perf_counter()
        layer = None if source.layer is None else list(source.layer)
        e = flaxcam.explain(net, variables, inputs[start : start + batch], method=source.method, layer=layer)
        maps.append(np.asarray(e.maps[:, 0]))
        logits.append(np.asarray(e.logits))
        seconds.append((time.perf_counter() - began) / len(inputs[start : start + batch]))
        low = e.low_res if isinstance(e.low_res, tuple) else (e.low_res,)
        native = max((tuple(x.shape[-2:]) for x in low), key=lambda s: s[0] * s[1])
    steady = seconds[1:] or seconds
    return {
        "maps": np.concatenate(maps),
        "logits": np.concatenate(logits),
        "native": native,
        "seconds": float(np.mean(steady)),
    }


# --- scoring ------------------------------------------------------------------------------------


def rule_grid(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, kwargs of localize.boxes) for every rule scored."""
    grid = [(rule, {"rule": rule}) for rule in localize.BOX_RULES]
    grid += [
        (f"fixed{t:.1f}", {"rule": "paper", "threshold": t})
        for t in config["fixed_thresholds"]
        if t != localize.DEFAULT_THRESHOLD
    ]
    grid += [
        (f"energy{s:.1f}", {"rule": "energy", "energy_share": s})
        for s in config["energy_shares"]
        if s != localize.DEFAULT_ENERGY_SHARE
    ]
    return grid


def rule_boxes(maps: np.ndarray, native: tuple[int, int], kwargs: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Boxes of every map (one jitted call, timed after compiling) and seconds per image."""
    device_maps = jnp.asarray(maps)
    localize.boxes(device_maps, map_shape=native, **kwargs).block_until_ready()  # compile for this shape
    began = time.perf_counter()
    out = localize.boxes(device_maps, map_shape=native, **kwargs).block_until_ready()
    return np.asarray(out), (time.perf_counter() - began) / len(maps)


def scores(iou: np.ndarray, points: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """IoU >= 0.5, mean IoU and pointing game over correctly classified objects and over all images."""
    out: dict[str, float] = {"images": len(iou), "correct": int(correct.sum())}
    if correct.any():
        out.update(
            {
                "iou>=0.5": float((iou[correct] >= 0.5).mean()),
                "mean_iou": float(iou[correct].mean()),
                "pointing_game": float(points[correct].mean()),
            }
        )
    out.update(
        {
            "iou>=0.5_all": float((iou >= 0.5).mean()),
            "mean_iou_all": float(iou.mean()),
            "pointing_game_all": float(points.mean()),
        }
    )
    return out


def evaluate(
    maps: np.ndarray, native, gt_boxes: np.ndarray, correct: np.ndarray, groups: dict[str, np.ndarray], grid
) -> dict[str, Any]:
    """Every rule's scores per group of images (e.g. split x kind) on maps ``(N, S, S)``."""
    gt = jnp.asarray(gt_boxes, jnp.float32)
    points = np.asarray(metrics.pointing_hits(jnp.asarray(maps), gt))
    out = {}
    for label, kwargs in grid:
        boxes, seconds = rule_boxes(maps, native, kwargs)
        iou = np.asarray(localize.box_iou(jnp.asarray(boxes), gt))
        out[label] = {
            "seconds_per_image": seconds,
            **{g: scores(iou[m], points[m], correct[m]) for g, m in groups.items()},
        }
    return out


def acceptable(logits: np.ndarray, kinds: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Is each image's top-1 class acceptable for its kind?"""
    allowed = [{int(c) for c in config["objects"][k]["acceptable"]} for k in KINDS_ORDER]
    top = np.argmax(logits, axis=1)
    return np.asarray([int(t) in allowed[k] for t, k in zip(top, kinds)])


def groups_of(held_out: np.ndarray, kinds: np.ndarray) -> dict[str, np.ndarray]:
    groups = {"dev": ~held_out, "held_out": held_out}
    for k, kind in enumerate(KINDS_ORDER):
        groups[f"held_out/{kind}"] = held_out & (kinds == k)
        groups[f"dev/{kind}"] = ~held_out & (kinds == k)
    return groups


def choose_on_dev(results: dict[str, Any]) -> str:
    """The rule (of the library's rules and the energy / fixed variants) with the highest development
    IoU >= 0.5 on correctly classified objects of the default maps; ties: the library rule first."""
    return max(results, key=lambda label: results[label]["dev"].get("iou>=0.5", -1.0))


def digits_scores(run: Path, grid) -> dict[str, Any]:
    """The rules on a digits probe's saved CAM maps (test canvases, seed 1)."""
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else None
    spec = json.loads((Path(__file__).parent / "configs" / "digits_localization.json").read_text())
    maps = np.load(run / "maps_cam.npy").astype(np.float32)
    test = common.digits(spec["data"], len(maps), seed=1)
    model, variables, _ = models.load_bundle(run / "model.msgpack")
    train_config = common.train_config(spec["train"], input_size=spec["data"]["size"])
    logits = common.predict(model, variables, common.model_inputs(train_config, test.images))
    correct = np.argmax(logits, 1) == test.labels
    downsample = 2 ** spec["train"]["model_kwargs"]["downsamplings"]
    native = (spec["data"]["size"][0] // downsample, spec["data"]["size"][1] // downsample)
    out = evaluate(maps, native, test.boxes, correct, {"test": np.ones(len(maps), bool)}, grid)
    return {
        "run": str(run),
        "config_seen": config is not None,
        "native": list(native),
        "accuracy": float(correct.mean()),
        "rules": out,
    }


def figure(path: Path, panels: list[dict[str, Any]]) -> None:
    """Rows of overlays: image, CAM, ground truth (green), paper box (red), auto box (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 5
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows))
    for ax, panel in zip(np.ravel(axes), panels):
        ax.imshow(panel["image"])
        ax.imshow(panel["map"], cmap="jet", alpha=0.4, extent=(0, panel["image"].shape[1], panel["image"].shape[0], 0))
        for box, colour, style in (
            (panel["gt"], "lime", "-"),
            (panel["paper"], "red", "--"),
            (panel["auto"], "cyan", "-"),
        ):
            x0, y0, x1, y1 = box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=2, ls=style))
        ax.set_title(panel["title"], fontsize=8)
        ax.axis("off")
    for ax in np.ravel(axes)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("green: ground truth   red dashed: paper (20%)   cyan: auto", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=common.ROOT / "configs" / "real_photo_boxes.json")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--digits", type=Path, default=None, help="a digits probe run folder (maps_cam.npy, model.msgpack)"
    )
    parser.add_argument("--sources", nargs="*", default=[s.name for s in MAP_SOURCES])
    parser.add_argument("--save-maps", action="store_true", help="also save each source's maps (float16 .npy, large)")
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the Markdown tables (and add --digits) from the saved JSON"
    )
    args = parser.parse_args(argv)
    if args.tables_only:
        out = args.out or common.RESULTS
        results: dict[str, Any] = json.loads((out / "real_photo_boxes.json").read_text())
        if args.digits is not None:
            results["digits"] = digits_scores(args.digits, rule_grid(results["config"]))
            common.write_json(out / "real_photo_boxes.json", results)
        (out / "real_photo_boxes.md").write_text(markdown_tables(results))
        print(markdown_tables(results))
        return
    config = common.load_config(args.config, args.smoke)
    out = args.out or (common.RESULTS / "smoke" if args.smoke else common.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    grid = rule_grid(config)

    bench = make_benchmark(config)
    names, photos, photo_boxes, photo_kinds = whole_photos(config)
    model, variables, meta = models.pretrained_efficientnet_lite0()
    groups = groups_of(bench.held_out, bench.kinds)
    results = {
        "config": config,
        "provenance": common.provenance("python -m experiments.real_photo_boxes"),
        "rules": [label for label, _ in grid],
        "sources": {},
    }
    panels_source: dict[str, Any] = {}
    by_name = {s.name: s for s in MAP_SOURCES}
    unknown = [name for name in args.sources if name not in by_name]
    if unknown:
        parser.error(f"unknown map sources {unknown}; valid: {', '.join(by_name)}")
    for source in [by_name[name] for name in args.sources]:  # in the order given
        began = time.perf_counter()
        inputs = model_inputs(bench.images, source.input_size, meta)
        explained = explain_source(model, variables, inputs, source, config["batch"])
        scale = source.input_size / config["size"]
        if args.save_maps:
            np.save(out / f"maps_{source.name}.npy", explained["maps"].astype(np.float16))
        correct = acceptable(explained["logits"], bench.kinds, config)
        rules = evaluate(explained["maps"], explained["native"], bench.boxes * scale, correct, groups, grid)
        photo_inputs = model_inputs(photos, source.input_size, meta)
        photo_explained = explain_source(model, variables, photo_inputs, source, len(photos))
        sizes = np.asarray([[p.shape[1], p.shape[0], p.shape[1], p.shape[0]] for p in photos], np.float32)
        photo_gt = photo_boxes / sizes * source.input_size
        photo_correct = acceptable(photo_explained["logits"], photo_kinds, config)
        photo_rules = evaluate(
            photo_explained["maps"],
            photo_explained["native"],
            photo_gt,
            photo_correct,
            {"photos": np.ones(len(photos), bool)},
            grid,
        )
        boxes_per_photo = {}
        for label in ("paper", "auto", "resolution", "otsu", "energy"):
            kwargs = dict(grid)[label]
            b, _ = rule_boxes(photo_explained["maps"], photo_explained["native"], kwargs)
            boxes_per_photo[label] = {
                n: (np.asarray(bx, np.float64) / source.input_size * sizes[i]).round().astype(int).tolist()
                for i, (n, bx) in enumerate(zip(names, b))
            }
        results["sources"][source.name] = {
            "native_map": list(explained["native"]),
            "auto_rule": localize.auto_rule(explained["native"]),
            "explain_seconds_per_image": explained["seconds"],
            "acceptable_top1": {g: float(correct[m].mean()) for g, m in groups.items()},
            "rules": rules,
            "dev_choice": choose_on_dev(rules),
            "photos": {
                "names": names,
                "acceptable_top1": photo_correct.tolist(),
                "top1": [int(t) for t in np.argmax(photo_explained["logits"], 1)],
                "rules": photo_rules,
                "boxes": boxes_per_photo,
            },
        }
        print(
            f"{source.name}: native {explained['native']}, {explained['seconds'] * 1e3:.0f} ms/image, "
            f"acceptable top-1 {correct[bench.held_out].mean():.3f} (held-out), dev choice {results['sources'][source.name]['dev_choice']}, "
            f"{time.perf_counter() - began:.0f}s",
            flush=True,
        )
        for label in ("paper", "resolution", "otsu", "energy", "auto", results["sources"][source.name]["dev_choice"]):
            r = rules[label]["held_out"]
            print(
                f"   {label:12s} held-out IoU>=0.5 {r.get('iou>=0.5', float('nan')):.3f}  mean IoU {r.get('mean_iou', float('nan')):.3f}  "
                f"pointing {r.get('pointing_game', float('nan')):.3f}   photos IoU>=0.5 {photo_rules[label]['photos']['iou>=0.5_all']:.2f}",
                flush=True,
            )
        common.write_json(out / "real_photo_boxes.json", results)  # after every source: partial results survive
        if source.name == "cam@224":
            panels_source = {
                "explained": explained,
                "photo": photo_explained,
                "photo_gt": photo_gt,
                "inputs_size": source.input_size,
            }

    if args.digits is not None:
        results["digits"] = digits_scores(args.digits, grid)
        d = results["digits"]["rules"]
        print(
            f"digits: accuracy {results['digits']['accuracy']:.3f}; "
            + ", ".join(
                f"{label} {d[label]['test']['iou>=0.5_all']:.3f}"
                for label in ("paper", "resolution", "otsu", "energy", "auto")
            ),
            flush=True,
        )

    common.write_json(out / "real_photo_boxes.json", results)
    (out / "real_photo_boxes.md").write_text(markdown_tables(results))
    if panels_source:
        figure(out / "real_photo_boxes.png", _panels(bench, photos, names, panels_source, config))
    print(f"results: {out / 'real_photo_boxes.json'}")


def markdown_tables(results: dict[str, Any]) -> str:
    """The results as Markdown: per map source, rules x (held-out IoU >= 0.5, mean IoU, pointing game,
    box time; whole photos; digits), then per kind for the default maps."""
    lines = [
        "| maps | rule | held-out IoU>=0.5 | mean IoU | pointing | dev IoU>=0.5 | photos IoU>=0.5 (all) | box ms/image | map ms/image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, source in results["sources"].items():
        labels = (
            [*list(localize.BOX_RULES), source["dev_choice"]]
            if source["dev_choice"] not in localize.BOX_RULES
            else list(localize.BOX_RULES)
        )
        for label in labels:
            r = source["rules"][label]
            h, d, ph = r["held_out"], r["dev"], source["photos"]["rules"][label]["photos"]
            shown = f"auto (= {source['auto_rule']})" if label == "auto" else label
            lines.append(
                f"| {name} {source['native_map'][0]}x{source['native_map'][1]} | {shown} | {h.get('iou>=0.5', float('nan')):.3f} | "
                f"{h.get('mean_iou', float('nan')):.3f} | {h.get('pointing_game', float('nan')):.3f} | {d.get('iou>=0.5', float('nan')):.3f} | "
                f"{ph['iou>=0.5_all']:.2f} | {r['seconds_per_image'] * 1e3:.2f} | {source['explain_seconds_per_image'] * 1e3:.0f} |"
            )
    lines += [
        "",
        "Correctly classified held-out objects per kind (acceptable top-1 rate, then IoU >= 0.5 per rule), default maps:",
        "",
    ]
    default = results["sources"].get("cam@224")
    if default:
        lines += [
            "| kind | acceptable top-1 | correct | " + " | ".join(localize.BOX_RULES) + " | pointing |",
            "|---|---|---|" + "---|" * (len(localize.BOX_RULES) + 1),
        ]
        for kind in KINDS_ORDER:
            g = f"held_out/{kind}"
            cells = [f"{default['rules'][rule][g].get('iou>=0.5', float('nan')):.2f}" for rule in localize.BOX_RULES]
            lines.append(
                f"| {kind} | {default['acceptable_top1'][g]:.2f} | {default['rules']['paper'][g]['correct']} | "
                + " | ".join(cells)
                + f" | {default['rules']['paper'][g].get('pointing_game', float('nan')):.2f} |"
            )
    if "digits" in results:
        d = results["digits"]
        title = (
            f"Digits canvases ({d['rules']['paper']['test']['images']} test canvases, {d['native'][0]}x{d['native'][1]} maps, "
            f"accuracy {d['accuracy']:.3f}), GAP CAM, all canvases / correctly classified:"
        )
        lines += [
            "",
            title,
            "",
            "| rule | IoU>=0.5 (all) | IoU>=0.5 (correct) | mean IoU (all) | pointing (all) |",
            "|---|---|---|---|---|",
        ]
        for label in localize.BOX_RULES:
            t = d["rules"][label]["test"]
            lines.append(
                f"| {label} | {t['iou>=0.5_all']:.3f} | {t.get('iou>=0.5', float('nan')):.3f} | {t['mean_iou_all']:.3f} | {t['pointing_game_all']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _panels(bench: Benchmark, photos, names, source: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    size = source["inputs_size"]
    panels = []
    photo = source["photo"]
    for label, maps, native, gts, images, titles in (
        ("photo", photo["maps"], photo["native"], source["photo_gt"], [_resize(p, size, size) for p in photos], names),
        (
            "held",
            source["explained"]["maps"],
            source["explained"]["native"],
            bench.boxes * size / config["size"],
            [_resize(im, size, size) for im in bench.images],
            [f"{KINDS_ORDER[k]} #{i}" for i, k in enumerate(bench.kinds)],
        ),
    ):
        pick = (
            list(range(len(images))) if label == "photo" else [i for i in range(len(images)) if bench.held_out[i]][:10]
        )
        paper, _ = rule_boxes(maps[pick], native, {"rule": "paper"})
        auto, _ = rule_boxes(maps[pick], native, {"rule": "auto"})
        for j, i in enumerate(pick):
            panels.append(
                {
                    "image": images[i],
                    "map": maps[i],
                    "gt": gts[i],
                    "paper": paper[j],
                    "auto": auto[j],
                    "title": titles[i],
                }
            )
    return panels


if __name__ == "__main__":
    main()
