"""Tests of the dataset audit: statistics vs NumPy, runner end to end (2,000+ images), resume after
kill -9 (real subprocess), 4 emulated devices = 1 device, report ranking, query, CLI, browser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam import audit, localize
from flaxcam.audit import stats as stats_lib
from flaxcam.audit import store
from flaxcam.audit.query import query
from tests import audit_helpers

SCRIPT = Path(__file__).parent / "audit_script.py"
E2E_COUNT = 2048


# --------------------------------------------------------------------------- statistics vs float64 NumPy


def _numpy_stats(m: np.ndarray, box, border: float, corner: float) -> dict[str, float]:
    """Independent float64 derivation with explicit pixel loops."""
    h, w = m.shape
    m = np.maximum(m.astype(np.float64), 0)
    total = m.sum()
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    ch, cw = max(1, round(corner * h)), max(1, round(corner * w))
    sums = {"border": 0.0, "tl": 0.0, "tr": 0.0, "bl": 0.0, "br": 0.0, "gt": 0.0}
    for y in range(h):
        for x in range(w):
            v = m[y, x]
            if y < bh or y >= h - bh or x < bw or x >= w - bw:
                sums["border"] += v
            sums["tl"] += v if (y < ch and x < cw) else 0
            sums["tr"] += v if (y < ch and x >= w - cw) else 0
            sums["bl"] += v if (y >= h - ch and x < cw) else 0
            sums["br"] += v if (y >= h - ch and x >= w - cw) else 0
            if box is not None and box[0] <= x + 0.5 < box[2] and box[1] <= y + 0.5 < box[3]:  # [x0, y0, x1, y1]
                sums["gt"] += v
    p = m / total
    nz = p[p > 0]
    peak = np.unravel_index(np.argmax(m), m.shape)
    return {
        "border_share": sums["border"] / total,
        **{f"corner_{c}_share": sums[c] / total for c in ("tl", "tr", "bl", "br")},
        "gt_share": sums["gt"] / total if box is not None else np.nan,
        "entropy": -(nz * np.log(nz)).sum() / np.log(h * w),
        "peak_y": (peak[0] + 0.5) / h,
        "peak_x": (peak[1] + 0.5) / w,
        "com_y": (p.sum(axis=1) * (np.arange(h) + 0.5) / h).sum(),
        "com_x": (p.sum(axis=0) * (np.arange(w) + 0.5) / w).sum(),
    }


def test_attention_stats_match_numpy():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 12, 20)).astype(np.float32) ** 3
    # [x0, y0, x1, y1] on 12 x 20 maps
    boxes = np.array([[3, 2, 11, 9], [0, 0, 20, 12], [np.nan] * 4, [7.2, 4.5, 19.9, 10.1]], np.float32)
    got = jax.device_get(stats_lib.attention_stats(maps, boxes, border=0.15, corner=0.25))
    for i in range(4):
        box = None if np.isnan(boxes[i]).any() else boxes[i]
        want = _numpy_stats(maps[i], box, 0.15, 0.25)
        for name, value in want.items():
            np.testing.assert_allclose(got[name][i], value, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)


def test_attention_stats_identities_and_degenerate_maps():
    uniform = np.ones((1, 10, 10), np.float32)
    got = jax.device_get(stats_lib.attention_stats(uniform, border=0.1, corner=0.2))
    assert got["corner_tl_share"][0] == pytest.approx(0.04)  # corner² of a uniform map
    assert got["border_share"][0] == pytest.approx(1 - 0.8**2)
    assert got["entropy"][0] == pytest.approx(1.0)
    spike = np.zeros((1, 10, 10), np.float32)
    spike[0, 9, 0] = 1
    got = jax.device_get(stats_lib.attention_stats(spike))
    assert got["corner_bl_share"][0] == 1 and got["corner_tl_share"][0] == 0 and got["entropy"][0] == 0
    assert (got["peak_y"][0], got["peak_x"][0]) == (0.95, 0.05)
    zero = jax.device_get(stats_lib.attention_stats(np.zeros((1, 6, 6), np.float32)))
    assert all(np.isnan(zero[k][0]) for k in ("border_share", "entropy", "com_x"))  # no energy: undefined, no crash
    mask = np.zeros((1, 10, 10), bool)
    mask[0, 9, 0] = True
    got = jax.device_get(stats_lib.attention_stats(spike, None, mask))
    assert got["gt_share"][0] == 1
    with pytest.raises(ValueError, match="border"):
        stats_lib.attention_stats(uniform, border=0.6)


def test_shard_indices_partition():
    for total, count in ((10, 3), (7, 7), (5, 8), (0, 2)):
        shards = [audit.shard_indices(total, i, count) for i in range(count)]
        merged = np.sort(np.concatenate(shards))
        np.testing.assert_array_equal(merged, np.arange(total))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="shard_index"):
        audit.shard_indices(10, 3, 3)


# --------------------------------------------------------------------------- runner end to end


@pytest.fixture(scope="module")
def full_audit(tmp_path_factory):
    """One uninterrupted audit of 2,048 generated images (some unreadable), shared by several tests."""
    out = tmp_path_factory.mktemp("audit") / "full"
    source = audit_helpers.make_source(E2E_COUNT)
    model, variables = audit_helpers.make_model()
    result = audit.run(
        source,
        model,
        variables,
        out,
        preprocessing=audit_helpers.PREPROCESSING,
        batch_size=64,
        progress=False,
        rows_per_part=500,
    )
    return out, result, source, model, variables


def test_end_to_end_rows_match_direct_explain(full_audit):
    out, result, _source, model, variables = full_audit
    bad = set(audit_helpers.bad_indices(E2E_COUNT))
    assert result.complete and result.total == E2E_COUNT
    assert (result.rows, result.errors) == (E2E_COUNT - len(bad), len(bad))
    rows = store.read_rows(out).to_pydict()
    errors = store.read_errors(out).to_pydict()
    assert sorted(rows["index"] + errors["index"]) == list(range(E2E_COUNT))
    assert set(errors["index"]) == bad and set(errors["reason"]) == {"corrupt test image"}
    assert len(set(rows["id"])) == len(rows["id"])
    manifest = store.read_manifest(out)
    assert manifest["status"] == "complete" and manifest["layer"] == "conv2" and manifest["method"] == "cam"
    assert manifest["counts"] == {"total": E2E_COUNT, "rows": result.rows, "errors": result.errors}
    assert manifest["low_res_shape"] == [16, 16]

    # A sample of rows recomputed independently: model.apply for predictions, explain + localize for maps.
    images, labels, boxes = audit_helpers.canvases(E2E_COUNT)
    pick = np.array([0, 1, 2, 500, 1234, E2E_COUNT - 1])
    position = {index: i for i, index in enumerate(rows["index"])}
    _, inputs = audit_helpers.PREPROCESSING(list(images[pick]))
    probabilities = np.asarray(jax.nn.softmax(model.apply(variables, inputs)))
    explanation = flaxcam.explain(model, variables, inputs, method="cam", layer="conv2")
    box = np.asarray(localize.boxes(explanation.maps[:, 0]))
    low = np.asarray(explanation.low_res[:, 0])
    for j, index in enumerate(pick):
        r = position[int(index)]
        order = np.argsort(-probabilities[j])[:3]
        assert rows["label"][r] == labels[index]
        assert rows["pred"][r] == order[0] and rows["topk_classes"][r] == list(order)
        np.testing.assert_allclose(rows["topk_probs"][r], probabilities[j][order], rtol=1e-5)
        assert rows["correct"][r] == (order[0] == labels[index])
        assert [rows[f"box_{k}"][r] for k in ("x0", "y0", "x1", "y1")] == list(box[j])
        np.testing.assert_allclose([rows[f"gt_{k}"][r] for k in ("x0", "y0", "x1", "y1")], boxes[index])
        decoded = store.decode_low_res([rows["low_res"][r]], (16, 16))[0]
        np.testing.assert_allclose(decoded, low[j], atol=1e-3)  # float16
        assert rows["box_iou"][r] == pytest.approx(float(localize.box_iou(box[j], boxes[index])), abs=1e-6)
        want = _numpy_stats(np.asarray(explanation.maps[j, 0]), boxes[index], 0.1, 0.2)
        for name in ("border_share", "corner_br_share", "gt_share", "entropy"):
            assert rows[name][r] == pytest.approx(want[name], rel=1e-4, abs=1e-6)


def test_rerun_of_complete_audit_does_nothing(full_audit):
    out, _, source, model, variables = full_audit

    def files():  # the lock file (.lock-p00000) is rewritten by every run
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".lock-")}

    before = files()
    result = audit.run(source, model, variables, out, preprocessing=audit_helpers.PREPROCESSING, progress=False)
    assert result.processed == 0 and result.complete
    assert files() == before


def test_resume_refuses_other_settings(full_audit):
    out, _, source, model, variables = full_audit
    with pytest.raises(ValueError, match="method: 'cam' -> 'gradcam'"):
        audit.run(
            source, model, variables, out, preprocessing=audit_helpers.PREPROCESSING, method="gradcam", progress=False
        )
    other = audit_helpers.make_model(seed=1)[1]
    with pytest.raises(ValueError, match="model_fingerprint"):
        audit.run(source, model, other, out, preprocessing=audit_helpers.PREPROCESSING, progress=False)


def test_run_argument_errors(tmp_path):
    source = audit_helpers.make_source(8, bad=False)
    model, variables = audit_helpers.make_model()
    kwargs = {"preprocessing": audit_helpers.PREPROCESSING, "progress": False}
    with pytest.raises(ValueError, match="target must be one of"):
        audit.run(source, model, variables, tmp_path / "a", target="true", **kwargs)
    with pytest.raises(ValueError, match="unknown method 'foo'; methods: ablationcam"):
        audit.run(source, model, variables, tmp_path / "b", method="foo", **kwargs)
    with pytest.raises(ValueError, match="one layer"):
        audit.run(source, model, variables, tmp_path / "c", layer=["conv1", "conv2"], **kwargs)
    with pytest.raises(flaxcam.LayerError, match="unknown layer 'conv9'"):
        audit.run(source, model, variables, tmp_path / "d", layer="conv9", **kwargs)


def test_limit_then_resume_in_process_and_label_target(tmp_path):
    """An audit done in pieces (limit=) equals one done at once; target="label" explains the label."""
    source = audit_helpers.make_source(150)
    model, variables = audit_helpers.make_model()
    kwargs = {"preprocessing": audit_helpers.PREPROCESSING, "batch_size": 32, "progress": False, "target": "label"}
    first = audit.run(source, model, variables, tmp_path / "pieces", limit=70, **kwargs)
    assert not first.complete and first.rows + first.errors == 70
    assert store.read_manifest(tmp_path / "pieces")["status"] == "incomplete"
    second = audit.run(source, model, variables, tmp_path / "pieces", **kwargs)
    assert second.complete and second.processed == 80
    audit.run(source, model, variables, tmp_path / "whole", **kwargs)
    a, b = store.read_rows(tmp_path / "pieces").to_pydict(), store.read_rows(tmp_path / "whole").to_pydict()
    assert a["index"] == b["index"] and a["low_res"] == b["low_res"] and a["target"] == b["target"]
    assert a["target"] == a["label"]  # every row is labelled here, so the label is explained


@pytest.mark.slow
def test_resume_after_kill_minus_9(tmp_path):
    """A real subprocess killed with SIGKILL mid-run; the rerun completes every image exactly once, and
    the rows hold the model's predictions."""
    count = 640
    out = tmp_path / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "run", str(out), str(count)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(store.part_files(out, "part")) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, (
        f"the audit ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = store.done_indices(out)
    assert 0 < len(partial) < count

    source = audit_helpers.make_source(count)
    model, variables = audit_helpers.make_model()
    result = audit.run(
        source,
        model,
        variables,
        out,
        preprocessing=audit_helpers.PREPROCESSING,
        batch_size=64,
        progress=False,
        rows_per_part=128,
    )
    assert result.complete and result.processed == count - len(partial)
    assert not list(out.glob(".*.tmp"))
    rows, errors = store.read_rows(out).to_pydict(), store.read_errors(out).to_pydict()
    assert sorted(rows["index"] + errors["index"]) == list(range(count))  # every image exactly once
    assert set(errors["index"]) == set(audit_helpers.bad_indices(count))
    images, _, _ = audit_helpers.canvases(count)
    _, inputs = audit_helpers.PREPROCESSING(list(images[rows["index"]]))
    assert rows["pred"] == np.argmax(np.asarray(model.apply(variables, inputs)), axis=-1).tolist()


@pytest.mark.slow
def test_four_emulated_devices_write_the_same_rows(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    count = 192
    subprocess.run(
        [sys.executable, str(SCRIPT), "devices", str(tmp_path / "all"), str(count)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    source = audit_helpers.make_source(count)
    model, variables = audit_helpers.make_model()
    audit.run(
        source,
        model,
        variables,
        tmp_path / "one",
        preprocessing=audit_helpers.PREPROCESSING,
        batch_size=64,
        progress=False,
        devices=jax.local_devices()[:1],
    )
    assert len(jax.local_devices()) == 1
    a, b = store.read_rows(tmp_path / "all").to_pydict(), store.read_rows(tmp_path / "one").to_pydict()
    assert len(a["index"]) == count - len(audit_helpers.bad_indices(count))
    for name in ("index", "id", "label", "pred", "target", "topk_classes", "box_x0", "box_y0", "box_x1", "box_y1"):
        assert a[name] == b[name], name
    for name in ("prob", "border_share", "corner_tl_share", "gt_share", "entropy", "com_y"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        store.decode_low_res(a["low_res"], (16, 16)), store.decode_low_res(b["low_res"], (16, 16)), atol=1e-3
    )
    assert store.read_errors(tmp_path / "all").to_pydict()["index"] == list(audit_helpers.bad_indices(count))


# --------------------------------------------------------------------------- query and report


def test_query_views(full_audit):
    out, result, *_ = full_audit
    _, rows = query(out, "SELECT count(*), count(DISTINCT id) FROM audit")
    assert rows == [(result.rows, result.rows)]
    _columns, rows = query(out, "SELECT count(*) FROM errors")
    assert rows == [(result.errors,)]
    table = store.read_rows(out, ["label", "corner_max_share"]).to_pydict()
    labels, shares = np.array(table["label"]), np.array(table["corner_max_share"])
    _, rows = query(out, "SELECT label, avg(corner_max_share) FROM audit GROUP BY label ORDER BY label")
    for label, mean in rows:
        assert mean == pytest.approx(shares[labels == label].mean(), rel=1e-5)
    with pytest.raises(FileNotFoundError, match="not an audit directory"):
        query(out.parent / "nowhere", "SELECT 1")


def _fake_audit(path: Path, class_of_rows: np.ndarray, corner_br: np.ndarray, border: np.ndarray) -> None:
    """An audit directory with chosen statistics (other columns filler), written with the store API."""
    n = len(class_of_rows)
    rows: dict[str, Any] = {field.name: None for field in store.SCHEMA}
    zeros = np.zeros(n, np.float32)
    rows.update(
        index=np.arange(n),
        id=[str(i) for i in range(n)],
        label=class_of_rows,
        pred=class_of_rows,
        prob=zeros + 0.9,
        correct=np.ones(n, bool),
        target=class_of_rows,
        target_prob=zeros + 0.9,
        topk_classes=[[int(c)] for c in class_of_rows],
        topk_probs=[[0.9]] * n,
        box_x0=np.zeros(n, np.int32),
        box_y0=np.zeros(n, np.int32),
        box_x1=np.full(n, 4, np.int32),
        box_y1=np.full(n, 4, np.int32),
        gt_x0=zeros + np.nan,
        gt_y0=zeros + np.nan,
        gt_x1=zeros + np.nan,
        gt_y1=zeros + np.nan,
        box_iou=zeros + np.nan,
        border_share=border,
        corner_tl_share=zeros + 0.04,
        corner_tr_share=zeros + 0.04,
        corner_bl_share=zeros + 0.04,
        corner_br_share=corner_br,
        corner_max_share=np.maximum(corner_br, 0.04),
        gt_share=zeros + np.nan,
        entropy=zeros + 0.9,
        peak_y=zeros + 0.5,
        peak_x=zeros + 0.5,
        com_y=zeros + 0.5,
        com_x=zeros + 0.5,
        low_res=[np.full((2, 2), 0.5, np.float16).tobytes()] * n,
        process=np.zeros(n, np.int32),
    )
    path.mkdir()
    store.write_part(path / store.part_name("part", 0, 0), store.rows_table(rows))
    store.write_json(
        path / store.MANIFEST,
        {
            "class_names": ["a", "b", "c"],
            "preprocessing": {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]},
            "low_res_shape": [2, 2],
            "source_spec": None,
            "source_length": n,
            "status": "complete",
        },
    )


def test_class_ranking_is_glass_delta(tmp_path):
    from flaxcam.audit.query import connect
    from flaxcam.audit.report import class_statistics, rank_classes

    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], 40).astype(np.int32)
    corner = rng.normal(0.05, 0.01, 120).astype(np.float32)
    corner[classes == 2] += 0.05  # class 2 looks at the bottom-right corner
    border = rng.normal(0.3, 0.02, 120).astype(np.float32)
    _fake_audit(tmp_path / "fake", classes, corner, border)
    connection = connect(tmp_path / "fake")
    stats = class_statistics(connection)
    for i, c in enumerate(stats["classes"]):
        inside, rest = corner[classes == c].astype(np.float64), corner[classes != c].astype(np.float64)
        assert stats["z_corner_br_share"][i] == pytest.approx((inside.mean() - rest.mean()) / rest.std(), rel=1e-4)
    order = rank_classes(stats)
    assert stats["classes"][order[0]] == 2 and stats["driver"][order[0]] == "corner_br_share"
    assert np.isnan(stats["z_off_gt_share"]).all()  # no ground truth: that statistic is not ranked


@pytest.fixture(scope="module")
def report_path(full_audit):
    from flaxcam.audit.report import write_report

    out, _, source, *_ = full_audit
    return write_report(out, source=source, gallery_size=6)


def test_report_is_self_contained(report_path):
    import re

    text = report_path.read_text()
    assert "Classes ranked by unusual attention" in text and "Confusion matrix" in text
    assert text.count("<figure>") >= 6 and "images not shown" not in text
    sources = re.findall(r"""(?:src|href)=["']([^"']+)""", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in text and "https://" not in text
    assert "Unreadable inputs (22)" in text


@pytest.mark.slow
def test_report_in_headless_chromium(report_path, tmp_path):
    from tests import browser

    binary, reason = browser.ensure_chromium()
    if binary is None:
        pytest.skip(reason)
    page = browser.open_page(binary, report_path)
    assert page["console_errors"] == []
    assert [url for url in page["requests"] if not url.startswith(("file:", "data:"))] == []
    import io

    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page["screenshot"])).convert("RGB"), np.float32)
    assert shot.shape[0] > 500 and shot.std() > 10  # not blank
    # The harness itself sees errors (so an empty list above means something).
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body>x<script>console.error('planted'); missing();</script></body></html>")
    assert len(browser.open_page(binary, bad)["console_errors"]) == 2


def test_box_on_a_coarser_grid_is_close_to_the_exact_box():
    """The audit's default box (20% rule on the map upsampled to at most 64 px, scaled) against the exact
    rule at the input resolution: equal when the input is small, IoU >= 0.8 otherwise (blob maps)."""
    from flaxcam import ops

    assert stats_lib.box_grid((32, 48), 64) == (32, 48) and stats_lib.box_grid((224, 448), 64) == (32, 64)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:7, 0:7]
    low = np.stack(
        [
            np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
            for cy, cx, s in zip(rng.uniform(0, 6, 16), rng.uniform(0, 6, 16), rng.uniform(0.5, 1.5, 16))
        ]
    ).astype(np.float32)
    for size in ((56, 56), (224, 224)):
        exact = localize.boxes(ops.minmax_normalize(ops.resize_maps(jnp.asarray(low), size)))
        grid = stats_lib.box_grid(size, 64)
        approx = stats_lib.boxes_from_low_res(jnp.asarray(low), size, grid, 0.2)
        if grid == size:
            np.testing.assert_array_equal(approx, exact)
        else:
            assert float(localize.box_iou(exact, approx).min()) >= 0.8


def test_host_boxes_equal_localize_boxes():
    """The audit finds the largest component on the host (scipy, whole stack at once); it must give
    exactly flaxcam.localize's boxes: several components, ties, empty and all-zero maps."""
    rng = np.random.default_rng(1)
    maps = rng.random((40, 24, 31)).astype(np.float32) ** 4  # many components above 20% of the max
    maps[3] = 0  # no energy
    maps[4] = 0
    maps[4, 2, 2] = maps[4, 10, 10] = 1  # a tie: two single pixels, the first in raster order wins
    maps[5] = 0
    maps[5, :, 5] = 1  # one vertical line
    mask = np.asarray(stats_lib.foreground_on_grid(jnp.asarray(maps), None, maps.shape[1:], 0.2))
    host = stats_lib.largest_component_boxes(mask)
    np.testing.assert_array_equal(host, np.asarray(localize.boxes(jnp.asarray(maps), 0.2)))
    assert list(host[3]) == [0, 0, 0, 0] and list(host[4]) == [2, 2, 3, 3] and list(host[5]) == [5, 0, 6, 24]
    low = jnp.asarray(rng.random((6, 7, 7)).astype(np.float32))
    grid = (40, 40)
    mask = np.asarray(stats_lib.foreground_on_grid(jnp.zeros((6, 224, 224)), low, grid, 0.2))
    scaled = stats_lib.scale_boxes(stats_lib.largest_component_boxes(mask), grid, (224, 224))
    np.testing.assert_array_equal(scaled, np.asarray(stats_lib.boxes_from_low_res(low, (224, 224), grid, 0.2)))
    iou = stats_lib.box_iou_xyxy(scaled, np.array([[0, 0, 224, 224]] * 5 + [[np.nan] * 4]))
    np.testing.assert_allclose(
        iou[:5], np.asarray(localize.box_iou(scaled[:5], jnp.array([0, 0, 224, 224]))), rtol=1e-6
    )
    assert np.isnan(iou[5])
