"""``flaxcam bench`` (flaxcam.bench.run): one round on small models — records, files, user models, the
method-not-measured record, profiler traces — and the arithmetic of the derived fields. Speed is never
asserted."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from flaxcam.bench import command, report
from flaxcam.cli import app


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cli_bench_writes_records_table_chart_and_traces(tmp_path):
    out, traces = tmp_path / "out", tmp_path / "traces"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            "small_cnn",
            "--methods",
            "cam,gradcam,no_such_method",
            "--batch",
            "2,1",
            "--size",
            "32,40",
            "--rounds",
            "1",
            "--devices",
            "2",
            "--out",
            str(out),
            "--profile",
            str(traces),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["bench_cpu.jsonl", "bench_cpu.md", "bench_cpu.png"]
    rows = _rows(out / "bench_cpu.jsonl")
    ok = {(r["method"], r["batch"]): r for r in rows if r["status"] == "ok"}
    assert {"forward", "cam", "gradcam", "forward+backward", "postprocess"} == {m for m, _ in ok}
    assert {b for _, b in ok} == {1, 2}
    for r in ok.values():
        assert set(report.RECORD_FIELDS) - {"benchmark"} <= set(r) and r["benchmark"] == "bench"
        assert r["model"] == "small_cnn" and r["size"] == [32, 40] and r["rounds"] == 1
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=1e-3)
        assert r["best_images_per_s"] >= r["images_per_s"] * 0.999
        assert r["first_call_s"] > 0 and r["peak_rss_mib"] > 0 and r["machine"]["versions"]["jax"]
        assert r["command"].startswith("flaxcam bench --model small_cnn")
        assert r["devices"] == 2 and "device_count=2" in r["xla_flags"]  # the CPU split into 2 XLA devices
    assert ok[("gradcam", 1)]["latency_ms"] == pytest.approx(1000 * ok[("gradcam", 1)]["median_s"], rel=1e-3)
    assert "latency_ms" not in ok[("gradcam", 2)]
    assert ok[("gradcam", 2)]["ratio_to_own_forward"] == pytest.approx(
        ok[("gradcam", 2)]["images_per_s"] / ok[("forward", 2)]["images_per_s"], abs=2e-3
    )
    share = ok[("gradcam", 2)]["time_share"]
    assert (
        sum(share.values()) == pytest.approx(1.0, abs=0.01) and ok[("cam", 2)]["time_share"]["backward_to_layer"] == 0
    )
    missing = [r for r in rows if r["status"] == "error"]
    assert {r["method"] for r in missing} == {"no_such_method"} and "valid names are" in missing[0]["error"]
    table = (out / "bench_cpu.md").read_text()
    assert "| small_cnn | flaxcam | gradcam | 2 | 32x40 |" in table and "Not measured" in table
    listed = [line for line in table.splitlines() if line.startswith("- ") and "no_such_method" in line]
    assert len(listed) == 1  # listed once, not once per batch
    assert (out / "bench_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("cam", "gradcam", "forward"):  # one trace per method, at the largest batch
        assert list((traces / f"{method}_b2").rglob("*.xplane.pb")), method
    assert ok[("cam", 2)]["profile_files"]


LINEN_FACTORY = """
import flax.linen as nn
import jax
import jax.numpy as jnp


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="features")(x))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def build():
    model = Tiny()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))), {"input_size": (16, 16)}
"""

NNX_FACTORY = """
import jax.numpy as jnp
from flax import nnx


class TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.features = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.features(x)).mean(axis=(1, 2)))


def build():
    return TinyNNX(nnx.Rngs(0))
"""


@pytest.mark.slow
def test_user_linen_model_from_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_linen_model.py").write_text(textwrap.dedent(LINEN_FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers import what this process can
    records = command.run(model="my_linen_model:build", methods="gradcam,scorecam", batches="2", rounds=1)
    ok = {r["method"]: r for r in records if r["status"] == "ok" and r["batch"] == 2}
    assert set(ok) == {"forward", "gradcam", "scorecam"}
    assert ok["gradcam"]["model"] == "my_linen_model:build" and ok["gradcam"]["size"] == [16, 16]  # meta's size
    assert ok["gradcam"]["layer"] == "features"
    assert ok["scorecam"]["forward_passes_per_image"] == 4  # one masked pass per channel of the layer
    assert ok["scorecam"]["floor_images_per_s"] > 0 and "ratio_to_floor" in ok["scorecam"]


@pytest.mark.slow
def test_user_nnx_model_from_module_factory(tmp_path, monkeypatch):
    import flax.nnx as nnx
    import jax.numpy as jnp

    import flaxcam

    (tmp_path / "my_nnx_model.py").write_text(textwrap.dedent(NNX_FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_nnx_model import build

    flaxcam.explain(build(), jnp.ones((1, 16, 16, 3)), method="gradcam", layer="features")  # NNX, no variables
    assert isinstance(build(), nnx.Module)
    records = command.run(model="my_nnx_model:build", methods="gradcam", batches="2", size="16,16", rounds=1)
    ok = {r["method"] for r in records if r["status"] == "ok"}
    assert {"forward", "gradcam"} <= ok, [r.get("error") for r in records if r["status"] != "ok"]


def test_bad_options_fail_before_any_worker_starts(tmp_path):
    with pytest.raises(ValueError, match=r"package\.module:function"):
        command.run(model="not a module:build")
    with pytest.raises(ValueError, match="registered models are"):
        command.run(model="no_such_model")
    with pytest.raises(FileNotFoundError, match="no such file"):
        command.run(weights=tmp_path / "missing.msgpack")
    with pytest.raises(ValueError, match="positive integers"):
        command.run(model="small_cnn", batches="1,x")
    with pytest.raises(ValueError, match="H,W"):
        command.run(model="small_cnn", size="32")
    with pytest.raises(ValueError, match="float32, bfloat16"):
        command.run(model="small_cnn", dtype="float16")
    with pytest.raises(ValueError, match="N or all"):
        command.run(model="small_cnn", devices="two")


def test_method_lists():
    import flaxcam

    assert command.resolve_methods("all") == list(flaxcam.METHODS)
    assert command.resolve_methods("gradcam, cam,gradcam") == ["gradcam", "cam"]
    assert command.resolve_methods(None) == command.registry_methods()
    assert "scorecam" not in command.registry_methods()  # many forward passes per image: named to run


def _ok(method, batch, median_s, **extra):
    return {
        "status": "ok",
        "worker": "flaxcam",
        "library": "flaxcam",
        "method": method,
        "batch": batch,
        "median_s": median_s,
        "images_per_s": batch / median_s,
        **extra,
    }


def test_time_split_floor_and_latency_arithmetic():
    records = report.derive(
        [
            _ok("forward", 4, 0.010),
            _ok("forward+backward", 4, 0.016),
            _ok("postprocess", 4, 0.001),
            _ok("gradcam", 4, 0.018, needs_gradients=True),
            _ok("cam", 4, 0.013, needs_gradients=False),
            _ok("forward", 32, 0.040),
            _ok("scorecam", 4, 4.0, needs_gradients=False, forward_passes_per_image=64, chunk_size=32),
            _ok("gradcam", 1, 0.005, needs_gradients=True),
        ]
    )
    by = {(r["method"], r["batch"]): r for r in records}
    # gradcam: backward = 0.016 - 0.001 - 0.010 = 0.005; method = 0.018 - 0.010 - 0.005 - 0.001 = 0.002
    assert by[("gradcam", 4)]["time_split_s"] == pytest.approx(
        {"forward": 0.010, "backward_to_layer": 0.005, "method": 0.002, "postprocess": 0.001}
    )
    assert by[("gradcam", 4)]["time_share"]["forward"] == pytest.approx(0.010 / 0.018, abs=1e-3)
    assert by[("cam", 4)]["time_split_s"]["backward_to_layer"] == 0
    assert by[("cam", 4)]["time_split_s"]["method"] == pytest.approx(0.002)
    # floor: forward at batch 32 runs 800 images/s, 64 passes per image -> 12.5 images/s; scorecam runs 1
    assert by[("scorecam", 4)]["floor_images_per_s"] == pytest.approx(12.5)
    assert by[("scorecam", 4)]["ratio_to_floor"] == pytest.approx(0.08)
    assert by[("gradcam", 1)]["latency_ms"] == pytest.approx(5.0) and "latency_ms" not in by[("gradcam", 4)]
    assert "time_split_s" not in by[("gradcam", 1)]  # no pieces measured at batch 1


def test_command_line_lists_the_options_given():
    assert command.command_line({"model": "m:f", "batch": "1,8", "out": None, "peers": True, "rounds": 1}) == (
        "flaxcam bench --model m:f --batch 1,8 --peers --rounds 1"
    )


@pytest.mark.slow
@pytest.mark.parity
def test_peers_on_the_same_torchvision_weights(tmp_path):
    from flaxcam.bench import runner

    if runner.missing_peers():  # found without importing: torchvision needs define_torchvision_schemas first
        pytest.skip(f"parity extra not installed: {runner.missing_peers()}")
    records = command.run(
        model="resnet18",
        methods="gradcam,sess,dff",
        batches="1",
        size="64,64",
        rounds=1,
        peers=True,
        method_options={"num_scales": 2},
    )
    ok = {(r["library"], r["method"]) for r in records if r["status"] == "ok"}
    assert {
        ("flaxcam", "gradcam"),
        ("torch", "forward"),
        ("pytorch-grad-cam", "gradcam"),
        ("torchcam", "gradcam"),
        ("captum", "gradcam"),
        ("flaxcam", "sess"),
        ("pytorch-grad-cam", "sess"),  # SESS with the same options, around the same base method
        ("flaxcam", "dff"),
        ("pytorch-grad-cam", "dff"),  # DeepFeatureFactorization image by image, as flaxcam's dff
    } <= ok
    for method in ("gradcam", "sess", "dff"):
        peer = next(r for r in records if r.get("library") == "pytorch-grad-cam" and r["method"] == method)
        assert peer["flaxcam_speedup"] > 0


@pytest.mark.parity
def test_efficientnet_peer_model_has_the_references_logits():
    from flaxcam.bench import runner

    if runner.missing_peers():
        pytest.skip(f"parity extra not installed: {runner.missing_peers()}")
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    import torch

    from flaxcam.bench.torch_ref import efficientnet_lite0_reference
    from flaxcam.models.pretrained import efficientnet_lite0_weights_path

    reference = lite.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(efficientnet_lite0_weights_path(), weights_only=True))
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(efficientnet_lite0_reference()(images), reference.eval()(images), rtol=0, atol=0)


def test_nnx_twin_of_a_reference_model_has_the_linen_logits():
    """``api="nnx"`` times the NNX twin holding the linen model's weights (the ``nnx`` benchmark's pair)."""
    import jax

    from flaxcam.bench import models

    spec = {"model": "resnet18", "size": [32, 32], "seed": 3}
    linen, twin = models.load(spec), models.load({**spec, "api": "nnx"})
    assert (linen.api, twin.api, twin.variables) == ("linen", "nnx", None)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    from flax import nnx

    # jitted: the eager NNX forward pass runs (and compiles) op by op
    logits = nnx.jit(lambda model, x: model(x))(twin.model, images)
    expected = jax.jit(linen.model.apply)(linen.variables, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NNX twin: resnet18, resnet34, resnet50, efficientnet_lite0"):
        models.load({"model": "small_cnn", "api": "nnx"})


@pytest.mark.parity
def test_peer_sess_refuses_a_blur_pytorch_grad_cam_cannot_do():
    """pytorch-grad-cam's SESS blurs with sigma 5 or not at all: another smooth_sigma is refused with the
    reason (the worker records it for that candidate and times the others)."""
    from flaxcam.bench import runner, worker
    from flaxcam.bench.torch_ref import define_torchvision_schemas

    if runner.missing_peers():
        pytest.skip(f"parity extra not installed: {runner.missing_peers()}")
    define_torchvision_schemas()
    with pytest.raises(ValueError, match="sigma 5 or not at all"):
        worker._pytorch_grad_cam_meta(None, None, None, "sess", None, {"smooth_sigma": 2.0})
