"""experiments/faithfulness.py runs end to end at its smoke size (pretrained EfficientNet-Lite0, 2 photos,
2 methods); the full-size leaderboard is committed in experiments/results/faithfulness/."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


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
