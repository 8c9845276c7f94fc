"""The ``flaxcam explain`` command and the demo, end to end on small generated files."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxcam import models
from flaxcam.cli import app
from flaxcam.imageio import ImageReadError, Preprocessing, read_image

SIZE = (32, 32)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "model.msgpack"
    kwargs = {"num_classes": 4, "features": [8, 16]}
    model = models.create_model("small_cnn", **kwargs)
    variables = models.init_variables(model, (1, *SIZE, 3), seed=3)
    meta = {"input_size": list(SIZE), "mean": list(MEAN), "std": list(STD), "class_names": ["a", "b", "c", "d"]}
    models.save_bundle(path, model_name="small_cnn", model_kwargs=kwargs, variables=variables, meta=meta)
    return path, model, variables


def _write_images(folder):
    rng = np.random.default_rng(0)
    good = []
    for i, (h, w) in enumerate([(32, 32), (40, 60), (64, 48)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        good.append(path)
    gray = folder / "gray.png"
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(gray)
    good.append(gray)
    not_image = folder / "notes.png"
    not_image.write_text("this is not an image")
    truncated = folder / "truncated.png"
    truncated.write_bytes(good[1].read_bytes()[:200])
    return good, [not_image, truncated]


def test_explain_command_writes_figures_json_and_reports_bad_files(tmp_path, bundle):
    path, model, variables = bundle
    good, bad = _write_images(tmp_path)
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    files = [str(p) for p in [good[0], bad[0], good[1], good[2], bad[1], good[3]]]
    result = CliRunner().invoke(
        app,
        [
            "explain",
            *files,
            "--weights",
            str(path),
            "--method",
            "gradcam",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--json",
            str(summary),
        ],
    )
    assert result.exit_code == 1, result.output  # bad files → non-zero status at the end
    assert "notes.png: not a readable image file" in result.output
    assert "truncated.png" in result.output
    report = json.loads(summary.read_text())
    assert [r["file"] for r in report["images"]] == [str(p) for p in good]
    assert {e["file"] for e in report["errors"]} == {str(p) for p in bad}

    # independent check of the predictions: preprocess and run the model directly
    preprocessing = Preprocessing(SIZE, MEAN, STD)
    _, inputs = preprocessing([read_image(p) for p in good])
    probabilities = np.asarray(jax.nn.softmax(model.apply(variables, inputs)))
    for record, image_path, probs in zip(report["images"], good, probabilities):
        assert (out / record["figure"].split("/")[-1]).stat().st_size > 1000
        top = np.argsort(-probs)[:2]
        assert [entry["class"] for entry in record["top_k"]] == top.tolist()
        assert record["target"]["name"] == "abcd"[top[0]]
        np.testing.assert_allclose([e["probability"] for e in record["top_k"]], probs[top], rtol=1e-4)
        height, width = read_image(image_path).shape[:2]
        x0, y0, x1, y1 = record["box"]  # in the input file's pixels
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_explain_command_errors_are_clear(tmp_path, bundle):
    path, _, _ = bundle
    good, _ = _write_images(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app, ["explain", str(good[0]), "--weights", str(path), "--layer", "nope", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown layer 'nope'" in result.stderr and "conv2" in result.stderr
    result = runner.invoke(app, ["explain", str(good[0]), "--model", "resnet99", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model 'resnet99'" in result.output and "resnet50" in result.output
    result = runner.invoke(app, ["explain", str(good[0]), "--weights", str(tmp_path / "missing.msgpack")])
    assert result.exit_code == 2 and "missing.msgpack" in result.stderr


def test_read_image_converts_modes(tmp_path):
    rng = np.random.default_rng(1)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (10, 12, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65535, (10, 12), dtype=np.uint16)).save(deep)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).convert("CMYK").save(cmyk)
    for path in (rgba, deep, cmyk):
        image = read_image(path)
        assert image.shape == (10, 12, 3) and image.dtype == np.uint8
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "absent.png")


def test_explain_command_defaults_to_pretrained_efficientnet(tmp_path):
    from skimage import data

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    summary = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["explain", str(photo), "--method", "cam", "--out", str(tmp_path), "--json", str(summary)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(summary.read_text())["images"][0]
    assert 281 <= record["target"]["class"] <= 285, record["target"]  # a cat
    assert record["layer"] == "head"
    x0, y0, x1, y1 = record["box"]
    assert 0 <= x0 < x1 <= 451 and 0 <= y0 < y1 <= 300


@pytest.mark.slow
def test_photo_demo_runs(tmp_path):
    from flaxcam import demo

    demo.main(["--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {row["image"] for row in summary["photos"]} >= {"chelsea", "coffee"}
    assert len(list((tmp_path / "figures").glob("*.png"))) == 2 * len(summary["photos"])
    grid = summary["method_grid"]
    assert Path(grid["figure"]) == tmp_path / "method_grid.png"
    with Image.open(tmp_path / "method_grid.png") as image:  # 4 photo rows, a column per method
        assert image.width > 2 * image.height
    assert set(grid["ms_per_image"]) == set(demo.DEMO_GRID_METHODS) and grid["photos"] == list(demo.GRID_PHOTOS)


def test_demo_refuses_an_unknown_grid_method(capsys):
    from flaxcam import demo

    with pytest.raises(SystemExit):
        demo.main(["--grid-methods", "gradcam,nope"])
    assert "--grid-methods: unknown method 'nope'; valid methods: " in capsys.readouterr().err


@pytest.mark.slow
def test_digits_demo_runs_end_to_end_at_smoke_size(tmp_path):
    from flaxcam import demo

    demo.main(
        [
            "--digits",
            "--out",
            str(tmp_path),
            "--train-size",
            "128",
            "--epochs",
            "1",
            "--test-size",
            "32",
            "--figures",
            "2",
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"accuracy", "cam", "gradcam"}
    assert len(list((tmp_path / "figures").glob("*.png"))) == 4


def test_cli_method_help_lists_every_registered_method():
    from flaxcam import METHODS
    from flaxcam.cli import METHOD_NAMES

    assert METHOD_NAMES.split(", ") == sorted(METHODS)
