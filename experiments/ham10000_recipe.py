"""Experiment 4 — the HAM10000 recipe: train a GAP-head CNN on the real skin-lesion data and make the seed's
figure (input with top-3 classes, preprocessed input, CAM overlay with its 20%-rule box) for one image
of each of the 7 classes.

The data is not shipped: download HAM10000 (Tschandl et al. 2018; Harvard Dataverse,
doi:10.7910/DVN/DBW86T) and unpack it so that one folder holds ``HAM10000_metadata.csv`` (columns
``image_id`` and ``dx``, plus ``lesion_id``) and the 450x600 JPEGs in ``HAM10000_images_part_1/`` and
``HAM10000_images_part_2/``. Then:

    python -m experiments.ham10000_recipe --config experiments/configs/ham10000.json --root PATH/TO/HAM10000

The split keeps all images of a lesion on the same side (``lesion_id``), so near-duplicate images of one
lesion cannot inflate the validation accuracy. Training resumes from the last checkpoint when the
command is run again. ``--smoke`` runs the same code end to end on a generated fixture in the exact
layout (:func:`flaxcam.data.make_ham10000_fixture`) with a tiny model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import common
from flaxcam.cli import run_explain
from flaxcam.data import Ham10000Source, make_ham10000_fixture
from flaxcam.train import SourceFeed, TrainConfig, train


def lesion_split(lesion_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, val_indices)``: whole lesions go to validation until ``val_fraction`` of the
    images is reached (lesions in a seeded random order; an empty lesion id counts as its own lesion)."""
    keys = [lesion or f"#image{i}" for i, lesion in enumerate(lesion_ids)]
    lesions = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(lesions))
    target = val_fraction * len(keys)
    chosen: set[str] = set()
    count = 0
    by_lesion: dict[str, int] = {}
    for key in keys:
        by_lesion[key] = by_lesion.get(key, 0) + 1
    for i in order:
        if count >= target:
            break
        chosen.add(lesions[i])
        count += by_lesion[lesions[i]]
    is_val = np.array([key in chosen for key in keys])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; returns the results dict (also written to the results folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=common.ROOT / "configs" / "ham10000.json")
    parser.add_argument("--root", type=Path, default=None, help="the HAM10000 folder (metadata CSV + image folders)")
    parser.add_argument("--smoke", action="store_true", help="generated fixture in the HAM10000 layout, tiny model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes for JPEG decoding")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = common.load_config(args.config, args.smoke)
    out = common.output_folder(args)
    started = time.perf_counter()
    if args.smoke:
        root = make_ham10000_fixture(out / "ham10000_fixture", **config["fixture"])
    elif args.root is not None:
        root = args.root
    else:
        raise SystemExit("give --root PATH (the unpacked HAM10000 folder; see the module docstring) or --smoke")
    source = Ham10000Source(root)
    train_indices, val_indices = lesion_split(source.lesion_ids, config["val_fraction"], config["split_seed"])
    train_config = TrainConfig.from_dict(config["train"])
    result = train(
        train_config,
        SourceFeed(source, train_config, indices=train_indices.tolist(), worker_count=args.workers),
        eval_data=SourceFeed(source, train_config, indices=val_indices.tolist(), worker_count=args.workers),
        out=out / "runs" / "ham10000",
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr),
    )
    # One validation image per class (the first in metadata order), explained with the trained bundle.
    picks = {}
    for index in val_indices:
        label = int(source.labels[index])
        if label >= 0 and label not in picks and source.ids[index] in source.paths:
            picks[label] = int(index)
    for index in train_indices:  # classes absent from the validation split: take a training image
        label = int(source.labels[index])
        if label >= 0 and label not in picks and source.ids[index] in source.paths:
            picks[label] = int(index)
    chosen = [picks[label] for label in sorted(picks)]
    figures = out / "ham10000_figures"
    records, errors = run_explain(
        [source.paths[source.ids[i]] for i in chosen],
        weights=result.bundle,
        method=config["method"],
        out=figures,
        labels=[int(source.labels[i]) for i in chosen],
        progress=False,
    )
    results = {
        "config": config,
        "root": str(root),
        "images": {"train": len(train_indices), "val": len(val_indices)},
        "history": result.history,
        "figures": [
            {
                "image_id": source.ids[i],
                "true": source.class_names[int(source.labels[i])],
                "predicted": r["target"]["name"],
                "probability": r["target"]["probability"],
                "box": r["box"],
                "figure": str(Path(r["figure"]).relative_to(out)),
            }
            for i, r in zip(chosen, records)
        ],
        "errors": errors + [list(e) for e in result.errors],
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": common.provenance("python -m experiments.ham10000_recipe " + " ".join(argv or sys.argv[1:])),
    }
    common.write_json(out / ("ham10000_smoke.json" if args.smoke else "ham10000.json"), results)
    print(
        f"{len(records)} figures in {figures}; last validation accuracy {result.history[-1].get('eval_accuracy') if result.history else None}",
        file=sys.stderr,
    )
    return results


if __name__ == "__main__":
    run()
