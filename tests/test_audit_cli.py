"""``flaxcam audit`` / ``report`` / ``query`` end to end on an image folder with bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxcam import models
from flaxcam.audit import store
from flaxcam.cli import app

SIZE = (32, 32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "model.msgpack"
    kwargs = {"num_classes": 2, "features": [8, 16]}
    model = models.create_model("small_cnn", **kwargs)
    variables = models.init_variables(model, (1, *SIZE, 3), seed=3)
    meta = {"input_size": list(SIZE), "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["cats", "dogs"]}
    models.save_bundle(path, model_name="small_cnn", model_kwargs=kwargs, variables=variables, meta=meta)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir()
        for i, (h, w) in enumerate([(32, 32), (40, 60), (64, 48), (20, 30), (32, 32)]):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(root / "dogs" / "gray.png")
    good = root / "cats" / "0.png"
    (root / "cats" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "dogs" / "notes.png").write_text("not an image")
    return root


def test_audit_report_query_cli(bundle, folder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "audit"
    args = ["audit", f"folder:{folder}", "--out", str(out), "--weights", str(bundle), "--batch-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "11 images, 2 unreadable, of 13 (complete)" in result.output
    errors = store.read_errors(out).to_pydict()
    assert sorted(errors["id"]) == ["cats/truncated.png", "dogs/notes.png"]
    manifest = store.read_manifest(out)
    assert manifest["source_spec"] == f"folder:{folder}" and manifest["class_names"] == ["cats", "dogs"]

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "this run: 0 images" in again.output

    result = runner.invoke(app, ["query", str(out), "SELECT id, label FROM audit WHERE id LIKE 'dogs/%' ORDER BY id"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "id\tlabel" and lines[1:] == [f"dogs/{i}.png\t1" for i in range(5)] + ["dogs/gray.png\t1"]
    result = runner.invoke(app, ["query", str(out), "SELECT * FROM nowhere"])
    assert result.exit_code != 0

    report = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(out), "--out", str(report)])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "images not shown" not in text and text.count("<figure>") >= 11  # overlays re-read from folder:
    assert "cats/truncated.png" in text
