"""Does the audit find a planted shortcut? Train twin CNNs on digit canvases, audit both, compare reports.

* **marked** model: trained on canvases where ``marker_fraction`` (90%) of class ``marker_class``'s images
  carry a small magenta square in the bottom-right corner (a stand-in for a ruler or a sticker);
* **clean** twin: the same canvases, same seed and schedule, no marker.

Each is audited (CAM at the last conv) on a held-out set drawn like its training data: ``marked/`` is the
marked model on held-out canvases with the same planted markers, ``clean/`` the clean twin on clean
held-out canvases. The report should rank the marked class first with bottom-right-corner attention in
``marked/`` and not in ``clean/``. As a cross-check, ``clean_on_marked/`` audits the clean twin on the
*marked* held-out set (a salient square draws some attention even from a model that never learned it),
and the script measures each model's accuracy on the marked class's held-out images with and without the
marker (a model that relies on the shortcut fails without it).

    python -m experiments.audit_shortcut --out experiments/results/audit_shortcut

writes the ``marked/``, ``clean/`` and ``clean_on_marked/`` audit directories (``report.html`` in each) and
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The planted marker: a solid magenta square 2 px from the bottom-right corner.
MARKER_COLOUR = (1.0, 0.1, 0.9)
MARKER_CORNER = "bottom_right"


def marked_copy(images: np.ndarray, which: np.ndarray, size: int) -> np.ndarray:
    """Copy of float ``images`` ``(N, H, W, 3)`` with this experiment's marker (``size`` pixels) on the
    images selected by the boolean ``which`` (:func:`flaxcam.data.draw_marker`)."""
    from flaxcam.data import draw_marker

    return draw_marker(images, which, corner=MARKER_CORNER, size=size, colour=MARKER_COLOUR)


def planted(labels: np.ndarray, marker_class: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: a random ``fraction`` of the images of ``marker_class``."""
    rng = np.random.default_rng(seed)
    return (labels == marker_class) & (rng.random(len(labels)) < fraction)


def make_split(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 canvases, labels, and ground-truth boxes ``[x0, y0, x1, y1]``."""
    from flaxcam.data import make_digit_canvases

    digits = make_digit_canvases(
        count, size=(size, size), digit_size=(size // 3, size * 7 // 12), clutter_lines=2, seed=seed
    )
    return digits.images, digits.labels.astype(np.int32), digits.boxes.astype(np.float32)


def run_experiment(
    out: Path,
    *,
    train_count: int = 6000,
    audit_count: int = 1500,
    size: int = 48,
    epochs: int = 6,
    marker_class: int = 3,
    marker_fraction: float = 0.9,
    marker_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the twins, audit them, write the reports; returns (and writes) the summary."""
    from flaxcam import audit, train
    from flaxcam.audit.query import connect
    from flaxcam.audit.report import class_statistics, rank_classes, write_report
    from flaxcam.data import CLASS_NAMES, save_npz
    from flaxcam.imageio import Preprocessing
    from flaxcam.models.small import small_cnn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker_size = marker_size or max(3, size // 8)
    preprocessing = Preprocessing((size, size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def as_uint8(images: np.ndarray) -> np.ndarray:
        return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)

    train_images, train_labels, _ = make_split(train_count, size, seed)
    test_images, test_labels, test_boxes = make_split(audit_count, size, seed + 1)
    train_marked = planted(train_labels, marker_class, marker_fraction, seed + 2)
    test_marked = planted(test_labels, marker_class, marker_fraction, seed + 3)
    datasets = {
        "marked": as_uint8(marked_copy(train_images, train_marked, marker_size)),
        "clean": as_uint8(train_images),
    }
    specs = {}
    for name, images in (("marked", marked_copy(test_images, test_marked, marker_size)), ("clean", test_images)):
        path = save_npz(
            out / f"audit_set_{name}.npz", as_uint8(images), test_labels, class_names=CLASS_NAMES, boxes=test_boxes
        )
        specs[name] = f"npz:{path}"
    audits = {"marked": [("marked", "marked")], "clean": [("clean", "clean"), ("clean_on_marked", "marked")]}

    # Behavioural probe: the marked class's held-out images, with and without the marker.
    of_class = test_labels == marker_class
    probe_clean = preprocessing.normalize(as_uint8(test_images[of_class]).astype(np.float32) / 255)
    probe_marked = preprocessing.normalize(
        as_uint8(marked_copy(test_images[of_class], np.ones(of_class.sum(), bool), marker_size)).astype(np.float32)
        / 255
    )
    summary: dict[str, Any] = {
        "setup": {
            "train_count": train_count,
            "audit_count": audit_count,
            "size": size,
            "epochs": epochs,
            "marker_class": marker_class,
            "marker_fraction": marker_fraction,
            "marker_size": marker_size,
            "marker_corner": "bottom-right",
            "seed": seed,
            "model": "small_cnn (16, 32, 64), GAP",
            "method": "cam",
            "train_marked": int(train_marked.sum()),
            "audit_marked": int(test_marked.sum()),
        },
    }
    for name, images in datasets.items():
        started = time.perf_counter()
        model = small_cnn(10, (16, 32, 64))
        inputs = preprocessing.normalize(images.astype(np.float32) / 255)
        variables, losses = train.fit(
            model, inputs, train_labels, epochs=epochs, batch_size=64, seed=seed, progress=progress
        )
        train_seconds = time.perf_counter() - started
        with_marker = train.accuracy(model, variables, probe_marked, test_labels[of_class])
        without_marker = train.accuracy(model, variables, probe_clean, test_labels[of_class])
        for audit_name, data_name in audits[name]:
            audit_dir = out / audit_name
            result = audit.run(
                specs[data_name],
                model,
                variables,
                audit_dir,
                preprocessing=preprocessing,
                method="cam",
                batch_size=128,
                progress=progress,
                model_info={"model": f"small_cnn trained on {name} canvases", "audit_set": data_name},
            )
            report = write_report(audit_dir, gallery_size=12)
            connection = connect(audit_dir)
            try:
                stats = class_statistics(connection)
                accuracy = connection.execute("SELECT avg(CAST(correct AS DOUBLE)) FROM audit").fetchone()[0]
            finally:
                connection.close()
            order = rank_classes(stats)
            position = int(np.flatnonzero(stats["classes"] == marker_class)[0])
            summary[audit_name] = {
                "model": name,
                "audit_set": data_name,
                "final_train_loss": losses[-1],
                "train_seconds": round(train_seconds, 1),
                "audit_images_per_second": round(result.images_per_second, 1),
                "audit_accuracy": accuracy,
                "ranking": [
                    {"class": int(stats["classes"][i]), "score": float(stats["score"][i]), "driver": stats["driver"][i]}
                    for i in order
                ],
                "marked_class_rank": order.index(position) + 1,
                "marked_class_score": float(stats["score"][position]),
                "marked_class_driver": stats["driver"][position],
                "marked_class_z_corner_br": float(stats["z_corner_br_share"][position]),
                "marked_class_mean_corner_br": float(stats["mean_corner_br_share"][position]),
                "marked_class_accuracy_with_marker": with_marker,
                "marked_class_accuracy_without_marker": without_marker,
                "report": str(report.relative_to(out)),
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/audit_shortcut"))
    parser.add_argument("--train-count", type=int, default=6000)
    parser.add_argument("--audit-count", type=int, default=1500)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = run_experiment(
        args.out,
        train_count=args.train_count,
        audit_count=args.audit_count,
        size=args.size,
        epochs=args.epochs,
        seed=args.seed,
    )
    for name in ("marked", "clean", "clean_on_marked"):
        s = summary[name]
        top = s["ranking"][0]
        print(
            f"{name:>15}: audit accuracy {s['audit_accuracy']:.3f}; top class {top['class']} (z={top['score']:.2f}, "
            f"{top['driver']}); marked class rank {s['marked_class_rank']} (z corner_br={s['marked_class_z_corner_br']:.2f}); "
            f"class accuracy with / without marker {s['marked_class_accuracy_with_marker']:.3f} / "
            f"{s['marked_class_accuracy_without_marker']:.3f}"
        )


if __name__ == "__main__":
    main()
