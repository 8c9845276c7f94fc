"""Smoke-size run of experiments/audit_shortcut.py (the full run's numbers are in the README)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.audit_shortcut import (
    MARKER_COLOUR,
    marked_copy,
    planted,
    run_experiment,
)


def test_marker_drawn_only_where_planted():
    labels = np.array([3, 3, 1, 3, 2] * 40)
    which = planted(labels, 3, 0.9, seed=0)
    assert not which[labels != 3].any() and 0.75 < which[labels == 3].mean() < 1.0
    images = np.zeros((len(labels), 16, 16, 3), np.float32)
    drawn = marked_copy(images, which, size=3)
    corner = drawn[:, 11:14, 11:14]
    np.testing.assert_array_equal(np.all(corner == np.float32(MARKER_COLOUR), axis=(1, 2, 3)), which)
    assert (drawn[~which] == 0).all() and (images == 0).all()


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
    summary = run_experiment(tmp_path, train_count=128, audit_count=96, size=32, epochs=1, progress=False)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["setup"]["train_marked"] > 0 and saved["setup"]["audit_marked"] > 0
    for name in ("marked", "clean", "clean_on_marked"):
        result = summary[name]
        assert (tmp_path / name / "report.html").is_file()
        assert 1 <= result["marked_class_rank"] <= len(result["ranking"])
        assert {r["class"] for r in result["ranking"]} <= set(range(10))
        assert 0 <= result["marked_class_accuracy_with_marker"] <= 1
