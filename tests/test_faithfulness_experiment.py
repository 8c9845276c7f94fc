"""experiments/faithfulness.py runs end to end at its smoke size (pretrained EfficientNet-Lite0, 2 photos,
2 methods); the full-size leaderboard is committed in experiments/results/faithfulness/."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.optimized
def test_faithfulness_smoke(tmp_path):
    from experiments import faithfulness

    results = faithfulness.run(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "faithfulness.json").read_text())
    assert saved["methods"] == ["gradcam", "randomcam"] and len(saved["images"]) == 2
    rows = {(r["method"], r["column"]): r for r in results["leaderboard"]}
    for method in ("gradcam", "randomcam"):
        for column in ("deletion_auc", "insertion_auc", "road_combined", "adcc", "randomization_rank_correlation"):
            assert np.isfinite(rows[(method, column)]["mean"])
        assert 0 <= rows[(method, "insertion_auc")]["mean"] <= 1
    assert (tmp_path / "leaderboard.html").is_file() and (tmp_path / "curves.png").is_file()
    assert "Ranking agreement" in (tmp_path / "summary.md").read_text()


def test_faithfulness_digits_smoke(tmp_path):
    """--digits: the digits-canvas model (trained at its smoke size, then reused) scored on test canvases."""
    from experiments import faithfulness

    args = ["--smoke", "--digits", "4", "--batch-size", "4", "--out", str(tmp_path)]
    results = faithfulness.run(args)
    assert results["images"] == [f"canvas-{i:04d}" for i in range(4)] and results["images_scored"] == 4
    rows = {(r["method"], r["column"]): r for r in results["leaderboard"]}
    assert np.isfinite(rows[("gradcam", "road_combined")]["mean"])

    def checkpoints():  # the training state: rewritten by any further training step
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "model" / "checkpoints").rglob("*") if p.is_file()}

    trained, weights = checkpoints(), (tmp_path / "model" / "model.msgpack").read_bytes()
    faithfulness.run([*args, "--restart"])  # a finished model is reused, not trained again
    assert trained and checkpoints() == trained
    assert (tmp_path / "model" / "model.msgpack").read_bytes() == weights
    methods = faithfulness.digits_methods()
    assert "scorecam" in methods and not set(faithfulness.DIGITS_LEFT_OUT) & set(methods)


def test_pasted_objects_are_the_real_photo_benchmark_prefix():
    from experiments import faithfulness, real_photo_boxes

    images, ids = faithfulness.pasted_objects(3)
    config = json.loads((real_photo_boxes.common.ROOT / "configs" / "real_photo_boxes.json").read_text())
    config["count"] = 6
    bench = real_photo_boxes.make_benchmark(config)
    assert ids == ["pasted-0000-cat", "pasted-0001-cup", "pasted-0002-rocket"]
    np.testing.assert_array_equal(np.stack(images), bench.images[:3])


def test_summary_groups_and_ranking_agreement(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from experiments import faithfulness

    rng = np.random.default_rng(0)
    rows = []
    for method, quality in (("good", 1.0), ("bad", 0.0), ("randomcam", -1.0)):
        for image in ("chelsea", "pasted-0000-cat", "pasted-0001-cup"):
            row = {"id": image, "method": method}
            for column, _, lower in faithfulness.COLUMNS:
                row[column] = (-quality if lower else quality) + 0.01 * rng.normal()
            for step in ("explain", "confidence", "deletion_insertion", "road", "adcc", "randomization"):
                row[f"seconds_{step}"] = 0.5
            rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "scores.parquet")
    text = faithfulness.summary(tmp_path)
    assert "**bundled photos** (1 images)" in text and "**pasted objects** (2 images)" in text
    # two real methods, every metric orders them the same way: agreement +1 everywhere
    assert text.count("+1.00") == 3 * len(faithfulness.AGREEMENT)
