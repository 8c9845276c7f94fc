"""``--box-rule`` in ``flaxcam explain`` and the audit: the rule reaches the boxes and the resume settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import flaxcam
from flaxcam import audit, localize, models
from flaxcam.audit import store
from flaxcam.cli import app
from flaxcam.imageio import Preprocessing, read_image
from tests import audit_helpers

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


def test_explain_box_rule_reaches_the_boxes(tmp_path, bundle):
    path, model, variables = bundle
    rng = np.random.default_rng(1)
    files = []
    for i in range(3):
        file = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(file)  # input size: no rescaling
        files.append(file)
    _, inputs = Preprocessing(SIZE, MEAN, STD)([read_image(f) for f in files])
    explanation = flaxcam.explain(model, variables, inputs, method="cam", top_k=1)
    for rule in ("otsu", "auto"):
        summary = tmp_path / f"{rule}.json"
        result = CliRunner().invoke(
            app,
            [
                "explain",
                *map(str, files),
                "--weights",
                str(path),
                "--method",
                "cam",
                "--top-k",
                "1",
                "--box-rule",
                rule,
                "--out",
                str(tmp_path / rule),
                "--json",
                str(summary),
            ],
        )
        assert result.exit_code == 0, result.output
        expected = localize.boxes(explanation.maps[:, 0], rule=rule, map_shape=explanation.low_res.shape[-2:])
        assert [r["box"] for r in json.loads(summary.read_text())["images"]] == np.asarray(expected).tolist()


def test_explain_several_box_rules_records_and_draws_each(tmp_path, bundle):
    """--box-rule paper,otsu: each rule's box equals localize.boxes under that rule, 'box' is the first's,
    and the figure differs from the one-rule figure (the second box is drawn); an unknown rule in the
    list is named."""
    path, model, variables = bundle
    rng = np.random.default_rng(2)
    file = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(file)
    _, inputs = Preprocessing(SIZE, MEAN, STD)([read_image(file)])
    explanation = flaxcam.explain(model, variables, inputs, method="cam", top_k=1)
    records = {}
    for label, rules in (("one", "paper"), ("two", "paper, otsu,paper")):
        summary = tmp_path / f"{label}.json"
        args = ["explain", str(file), "--weights", str(path), "--method", "cam", "--top-k", "1"]
        result = CliRunner().invoke(
            app, [*args, "--box-rule", rules, "--out", str(tmp_path / label), "--json", str(summary)]
        )
        assert result.exit_code == 0, result.output
        records[label] = json.loads(summary.read_text())["images"][0]
    two = records["two"]
    assert list(two["boxes"]) == ["paper", "otsu"]
    for rule in ("paper", "otsu"):
        expected = localize.boxes(explanation.maps[:, 0], rule=rule, map_shape=explanation.low_res.shape[-2:])
        assert two["boxes"][rule] == np.asarray(expected)[0].tolist()
    assert two["box"] == two["boxes"]["paper"] == records["one"]["box"]
    assert two["boxes"]["otsu"] != two["boxes"]["paper"]  # this image's otsu box differs, so it is visible
    with Image.open(records["one"]["figure"]) as one, Image.open(two["figure"]) as drawn:
        assert not np.array_equal(np.asarray(one), np.asarray(drawn))

    result = CliRunner().invoke(
        app, ["explain", str(file), "--weights", str(path), "--box-rule", "paper,tight", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code != 0 and "unknown box rule 'tight'" in result.output + str(result.exception)


def test_explain_unknown_box_rule_lists_the_rules(tmp_path, bundle):
    path, _, _ = bundle
    file = tmp_path / "img.png"
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(file)
    result = CliRunner().invoke(
        app, ["explain", str(file), "--weights", str(path), "--box-rule", "tight", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0
    message = result.output + str(result.exception)
    assert "unknown box rule 'tight'" in message and "paper, resolution, otsu, energy, auto" in message


def test_audit_box_rule_is_recorded_used_and_part_of_the_resume_settings(tmp_path):
    source = audit_helpers.make_source(24, bad=False)
    model, variables = audit_helpers.make_model()
    kwargs = {"preprocessing": audit_helpers.PREPROCESSING, "batch_size": 8, "progress": False, "box_resolution": None}
    audit.run(source, model, variables, tmp_path / "otsu", box_rule="otsu", **kwargs)
    assert store.read_manifest(tmp_path / "otsu")["box_rule"] == "otsu"
    rows = store.read_rows(tmp_path / "otsu").to_pydict()
    order = np.argsort(rows["index"])
    got = np.stack([np.asarray(rows[k])[order] for k in ("box_x0", "box_y0", "box_x1", "box_y1")], axis=1)

    images = np.stack([source[i].image for i in range(24)])
    _, inputs = audit_helpers.PREPROCESSING(list(images))
    explanation = flaxcam.explain(model, variables, inputs, method="cam")
    expected = localize.boxes(explanation.maps[:, 0], rule="otsu", map_shape=explanation.low_res.shape[-2:])
    np.testing.assert_array_equal(got, np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(localize.boxes(explanation.maps[:, 0])))

    with pytest.raises(ValueError, match="box_rule"):
        audit.run(source, model, variables, tmp_path / "otsu", box_rule="paper", **kwargs)
    with pytest.raises(ValueError, match="valid rules"):
        audit.run(source, model, variables, tmp_path / "bad", box_rule="tight", **kwargs)


def test_explain_atrous_on_a_model_without_the_option_says_which_have_it(tmp_path, bundle):
    path, _, _ = bundle
    file = tmp_path / "img.png"
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(file)
    result = CliRunner().invoke(
        app, ["explain", str(file), "--weights", str(path), "--atrous", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0
    message = result.output + str(result.exception)
    assert "atrous" in message and "efficientnet_lite0" in message


def test_explain_size_upscales_the_input_and_refines_the_map(tmp_path, bundle):
    """--size H,W explains at another input size (test-time upscaling): twice the input, twice the map,
    and the box stays in the original image's pixels; a bad size is refused."""
    path, _, _ = bundle
    file = tmp_path / "img.png"
    image = np.zeros((*SIZE, 3), np.uint8)
    image[8:20, 10:24] = 255  # a bright block, so the map has one blob
    Image.fromarray(image).save(file)
    records = {}
    for label, extra in (("default", []), ("upscaled", ["--size", f"{2 * SIZE[0]},{2 * SIZE[1]}"])):
        summary = tmp_path / f"{label}.json"
        result = CliRunner().invoke(
            app,
            [
                "explain",
                str(file),
                *("--weights", str(path), "--method", "cam", "--out", str(tmp_path / label)),
                *("--json", str(summary), *extra),
            ],
        )
        assert result.exit_code == 0, result.output
        records[label] = json.loads(summary.read_text())["images"][0]
    assert records["default"]["input_size"] == list(SIZE)
    assert records["upscaled"]["input_size"] == [2 * SIZE[0], 2 * SIZE[1]]
    assert records["upscaled"]["map_size"] == [2 * v for v in records["default"]["map_size"]]
    x0, y0, x1, y1 = records["upscaled"]["box"]
    assert 0 <= x0 < x1 <= SIZE[1] and 0 <= y0 < y1 <= SIZE[0]  # in the original image's pixels
    result = CliRunner().invoke(app, ["explain", str(file), "--weights", str(path), "--size", "0,5"])
    assert result.exit_code == 2 and "--size" in result.output
