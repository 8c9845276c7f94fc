"""Each experiment runs end to end at its smoke size (the full-size results are in experiments/results)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_digits_then_sanity_check_smoke(tmp_path):
    from experiments import digits_gap_gmp, sanity_check

    results = digits_gap_gmp.run(["--smoke", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "digits_gap_gmp.json").read_text())
    assert set(saved["runs"]) == {"avg", "max"}
    for run in saved["runs"].values():
        assert 0 <= run["accuracy"] <= 1
        for method in ("cam", "gradcam"):
            scores = run[method]
            assert 0 <= scores["top1_localization"] <= scores["box_iou>=0.5"] <= 1
            assert 0 <= scores["energy_pointing_game"] <= 1
    assert results["provenance"]["command"].startswith("python -m experiments.digits_gap_gmp")
    assert (tmp_path / "digits_gap_gmp.png").stat().st_size > 0

    sanity = sanity_check.run(["--smoke", "--out", str(tmp_path), "--no-progress"])  # reuses the GAP run
    assert list(sanity["methods"]) == ["cam", "gradcam"]
    for steps in sanity["methods"].values():
        assert [s["randomized"] for s in steps] == [["fc"], ["fc", "conv2"]]
        assert all(s["mean_rank_correlation"] is None or -1 <= s["mean_rank_correlation"] <= 1 for s in steps)
    assert (tmp_path / "sanity_check.png").exists()


def test_digits_localization_config_smoke(tmp_path):
    """The localization configuration: a background class (11 outputs) as the reference class (its
    logit pinned at 0), its own results name and run folders; the maps are still for the ten digit classes."""
    from experiments import digits_gap_gmp
    from flaxcam.models import load_bundle

    config = str(digits_gap_gmp.common.ROOT / "configs" / "digits_localization.json")
    results = digits_gap_gmp.run(["--config", config, "--smoke", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "digits_localization.json").exists() and (tmp_path / "digits_localization.png").exists()
    assert results["config"]["background_count"] == 16
    for pooling in ("avg", "max"):
        model, variables, meta = load_bundle(tmp_path / "runs" / f"digits_localization_{pooling}" / "model.msgpack")
        assert variables["params"]["fc"]["kernel"].shape[-1] == 11 and model.reference_class
        assert not variables["params"]["fc"]["kernel"][:, -1].any() and variables["params"]["fc"]["bias"][-1] == 0
        assert meta["class_names"][-1] == "background"
        assert len(results["runs"][pooling]["cam"]["per_class"]) == 10


def test_planted_shortcut_smoke(tmp_path):
    from experiments import planted_shortcut

    results = planted_shortcut.run(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert results["marked_test_images"] > 0
    for name in ("marked", "clean_twin"):
        for method in ("cam", "gradcam"):
            scores = results["runs"][name][method]
            assert len(scores["corner_attention_per_class"]) == 10
            assert 0 <= scores["auc_marked_vs_unmarked"] <= 1
    assert (tmp_path / "planted_shortcut.png").exists()


def test_ham10000_recipe_smoke_on_the_fixture(tmp_path):
    from experiments import ham10000_recipe

    results = ham10000_recipe.run(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert sorted(f["true"] for f in results["figures"]) == sorted(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    for figure in results["figures"]:
        assert (tmp_path / figure["figure"]).stat().st_size > 0
    assert results["images"]["train"] + results["images"]["val"] == 21 and not results["errors"]
    assert results["history"][-1]["eval_count"] == results["images"]["val"]


def test_lesion_split_keeps_lesions_together():
    from experiments.ham10000_recipe import lesion_split

    lesions = ["a", "a", "b", "c", "c", "c", "d", "", ""]
    train, val = lesion_split(lesions, 0.3, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(9))
    for lesion in "abcd":
        members = {i for i, l in enumerate(lesions) if l == lesion}
        assert members <= set(train.tolist()) or members <= set(val.tolist())
    assert len(val) >= 0.3 * 9
