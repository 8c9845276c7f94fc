"""flaxcam.evaluation.evaluate / `flaxcam evaluate`: the leaderboard over a data source — per-image scores
equal the metric functions called directly, the table's means and intervals come from those rows, an
unreadable image is recorded and skipped, a rerun resumes (every image exactly once), changed settings
are refused, and the HTML page is self-contained."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flaxcam import evaluation, explain
from flaxcam.data import open_source
from flaxcam.imageio import Preprocessing
from flaxcam.models import init_variables, save_bundle, small_cnn

SIZE = (24, 24)
OPTIONS = {"steps": 4, "percentiles": [30, 70], "chunk_size": 8, "noise": 0.0}  # ROAD's noise depends on batch position


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 28, 3), dtype=np.uint8)).save(root / f"class{i % 2}" / f"img{i}.png")
    (root / "class0" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def model_and_variables():
    model = small_cnn(num_classes=3, features=(4, 8))
    return model, init_variables(model, (1, *SIZE, 3), seed=0)


def _run(folder, model_and_variables, out, **kwargs):
    model, variables = model_and_variables
    return evaluation.evaluate(
        f"folder:{folder}",
        model,
        variables,
        out,
        preprocessing=Preprocessing(SIZE),
        methods="cam,gradcam",
        metrics="confidence,deletion_insertion,road",
        batch_size=4,
        options=OPTIONS,
        resamples=200,
        **kwargs,
    )


def test_leaderboard_scores_resume_and_errors(folder, model_and_variables, tmp_path):
    model, variables = model_and_variables
    out = tmp_path / "eval"
    partial = _run(folder, model_and_variables, out, limit=3)
    assert partial.images + partial.errors <= 3 + 1
    board = _run(folder, model_and_variables, out)  # resumes: the rest only
    scores = pq.read_table(board.scores)
    assert board.errors == 1 and board.images == 5
    for method in ("cam", "gradcam"):
        indices = [i for i, m in zip(scores["index"].to_pylist(), scores["method"].to_pylist()) if m == method]
        assert len(indices) == len(set(indices)) == 5  # every image exactly once per method
    # Per-image values equal the metric functions on the same inputs.
    source = open_source(f"folder:{folder}")
    good = sorted(set(scores["index"].to_pylist()))
    pre = Preprocessing(SIZE)
    images = jnp.asarray(pre([source[i].image for i in good])[1])
    targets = np.argmax(np.asarray(model.apply(variables, images)), axis=1)
    maps = explain(model, variables, images, method="gradcam", targets=jnp.asarray(targets)).maps[:, 0]
    curves = evaluation.deletion_insertion(model.apply, variables, images, maps, targets, steps=4, score="softmax")
    road = evaluation.road(
        model.apply, variables, images, maps, targets, percentiles=[30, 70], score="softmax", noise=0.0
    )
    table = {(r["method"], r["index"]): r for r in scores.to_pylist()}
    for k, index in enumerate(good):
        row = table[("gradcam", index)]
        assert row["target"] == targets[k]
        np.testing.assert_allclose(row["deletion_auc"], float(curves.deletion_auc[k]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(row["insertion_auc"], float(curves.insertion_auc[k]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(row["road_morf"], float(road["morf"][:, k].mean()), rtol=1e-4, atol=1e-6)
    # The table: mean of the rows, interval around it.
    summary = {(r["method"], r["column"]): r for r in board.table.to_pylist()}
    values = [table[("cam", i)]["insertion_auc"] for i in good]
    entry = summary[("cam", "insertion_auc")]
    np.testing.assert_allclose(entry["mean"], np.mean(values), rtol=1e-9)
    assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"] and entry["count"] == 5
    assert {t["step"] for t in board.timing.to_pylist()} == {"explain", "confidence", "deletion_insertion", "road"}
    page = board.html.read_text()
    assert "http://" not in page and "https://" not in page and "data:image/png;base64," in page
    assert (out / "curves.png").is_file() and json.loads((out / "leaderboard.json").read_text())["images"] == 5


def test_changed_settings_are_refused_and_bad_names_listed(folder, model_and_variables, tmp_path):
    model, variables = model_and_variables
    out = tmp_path / "eval"
    _run(folder, model_and_variables, out, limit=1)
    with pytest.raises(ValueError, match="different settings"):
        evaluation.evaluate(
            f"folder:{folder}",
            model,
            variables,
            out,
            preprocessing=Preprocessing(SIZE),
            methods="cam",
            metrics="confidence,deletion_insertion,road",
            options=OPTIONS,
        )
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['gradkam'\]; valid: all, ablationcam, cam, "):
        evaluation.evaluate(
            f"folder:{folder}", model, variables, out, preprocessing=Preprocessing(SIZE), methods="gradkam"
        )
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['roads'\]; valid: all, confidence"):
        evaluation.evaluate(
            f"folder:{folder}", model, variables, out, preprocessing=Preprocessing(SIZE), metrics="roads"
        )
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['step'\]; valid: score \(default softmax\)"):
        evaluation.evaluate(
            f"folder:{folder}", model, variables, out, preprocessing=Preprocessing(SIZE), options={"step": 3}
        )
    with pytest.raises(ValueError, match=r"strictly inside \(0, 100\)"):
        evaluation.evaluate(
            f"folder:{folder}",
            model,
            variables,
            out,
            preprocessing=Preprocessing(SIZE),
            options={"percentiles": [0, 50]},
        )


@pytest.mark.slow
def test_cli_evaluate(folder, model_and_variables, tmp_path):
    _, variables = model_and_variables
    bundle = tmp_path / "model.msgpack"
    save_bundle(
        bundle,
        model_name="small_cnn",
        model_kwargs={"num_classes": 3, "features": [4, 8]},
        variables=variables,
        meta={"input_size": list(SIZE)},
    )
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-c",
        "from flaxcam.cli import main; main()",
        "evaluate",
        f"folder:{folder}",
        "--weights",
        str(bundle),
        "--methods",
        "gradcam",
        "--metrics",
        "confidence,deletion_insertion",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 images (1 unreadable)" in result.stdout and (out / "leaderboard.html").is_file()
    from tests import browser

    binary, _reason = browser.ensure_chromium()
    if binary is not None:  # the page opens with no console error and no network request, like the audit report
        page = browser.open_page(binary, out / "leaderboard.html")
        assert page["console_errors"] == []
        assert [url for url in page["requests"] if not url.startswith(("file:", "data:"))] == []
    bad = subprocess.run(
        [*command[:-2], "--metrics", "rod", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert bad.returncode == 2 and "unknown metric(s) ['rod']; valid: all, confidence" in bad.stderr
