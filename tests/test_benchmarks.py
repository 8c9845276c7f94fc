"""The benchmark command's plumbing (tiny model, one round): output files, record schema, recorded errors.
Speed is measured by ``python -m benchmarks``, never asserted here."""

from __future__ import annotations

import json

import pytest

from benchmarks import __main__ as bench
from flaxcam.bench import report
from flaxcam.bench.command import EXPENSIVE_METHODS


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_command_writes_records_tables_and_charts(tmp_path):
    written = bench.main(
        [
            "--models",
            "small_cnn",
            "--methods",
            "cam",
            "gradcam",
            "fullgrad",
            "no_such_method",
            "--size",
            "32",
            "40",
            "--batch",
            "3",
            "--rounds",
            "1",
            "--no-peers",
            "--scaling-model",
            "small_cnn",
            "--batches",
            "1",
            "2",
            "--sizes",
            "32x40",
            "--devices",
            "1",
            "2",
            "--device-batch",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert sorted(p.name for p in written) == sorted(
        f"{part}_cpu.{ext}" for part in ("peers", "scaling") for ext in ("jsonl", "md", "png")
    )

    peers = _rows(tmp_path / "peers_cpu.jsonl")
    ok = [r for r in peers if r["status"] == "ok"]
    assert [r["method"] for r in ok] == ["forward", "cam", "gradcam", "fullgrad"]  # fullgrad: no layer= passed
    for r in ok:
        assert set(report.RECORD_FIELDS) <= set(r), set(report.RECORD_FIELDS) - set(r)
        assert r["model"] == "small_cnn" and r["batch"] == 3 and r["size"] == [32, 40] and r["rounds"] == 1
        assert r["images_per_s"] == pytest.approx(3 / r["median_s"], rel=1e-3)
        assert r["threads"] >= 1 and len(r["loadavg_start"]) == 3 and r["machine"]["versions"]["jax"]
        assert (
            r["env"]["MALLOC_MMAP_MAX_"] == "0" and r["worker_malloc_env"]["MALLOC_ARENA_MAX"] == "1"
        )  # --allocator tuned
    assert ok[0]["ratio_to_own_forward"] == 1.0
    errors = {r["method"]: r for r in peers if r["status"] == "error"}
    assert "valid names are" in errors["no_such_method"]["error"]  # recorded, the rest still ran
    skipped = [r for r in peers if r["status"] == "skipped"]
    assert skipped and skipped[0]["reason"] == "--no-peers"

    scaling = [r for r in _rows(tmp_path / "scaling_cpu.jsonl") if r["status"] == "ok"]
    seen = {(r["method"], r["batch"], r["devices"]) for r in scaling}
    assert seen == {(m, b, 1) for m in ("forward", "gradcam") for b in (1, 2)} | {("forward", 2, 2), ("gradcam", 2, 2)}
    for r in scaling:
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0
        assert r["memory_allocator"] == "default"  # measured apart from the tuned timing workers
    assert next(r for r in scaling if r["devices"] == 2)["emulated_devices"] == 2

    table = (tmp_path / "peers_cpu.md").read_text()
    assert "glibc malloc of the workers: tuned" in table
    assert "python -m benchmarks --models small_cnn" in table and "| small_cnn | flaxcam | gradcam | 3 |" in table
    assert (tmp_path / "scaling_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _record(worker, library, method, rate, batch=4):
    return {
        "status": "ok",
        "worker": worker,
        "library": library,
        "method": method,
        "batch": batch,
        "images_per_s": rate,
    }


def test_ratios_use_each_librarys_own_forward_pass():
    records = report.add_ratios(
        [
            _record("flaxcam", "flaxcam", "forward", 20.0),
            _record("flaxcam", "flaxcam", "gradcam", 18.0),
            _record("torch", "torch", "forward", 30.0),
            _record("torch", "pytorch-grad-cam", "gradcam", 6.0),
            _record("torch", "captum", "gradcam", 27.0),
            _record("torch", "torch", "forward", 10.0, batch=8),  # another batch: not a reference for batch 4
        ]
    )
    by_key = {(r["library"], r["method"], r["batch"]): r for r in records}
    assert by_key[("flaxcam", "gradcam", 4)]["ratio_to_own_forward"] == 0.9
    assert by_key[("pytorch-grad-cam", "gradcam", 4)]["ratio_to_own_forward"] == 0.2
    assert by_key[("pytorch-grad-cam", "gradcam", 4)]["flaxcam_speedup"] == 3.0
    assert by_key[("captum", "gradcam", 4)]["flaxcam_speedup"] == pytest.approx(0.667)
    assert by_key[("flaxcam", "gradcam", 4)]["flaxcam_speedup"] is None


def test_ratio_to_a_baseline_configuration():
    records = report.add_ratios(
        [_record("xla default", "flaxcam", "forward", 10.0), _record("xla fast_math", "flaxcam", "forward", 12.0)],
        baseline_worker="xla default",
    )
    assert [r["ratio_to_baseline"] for r in records] == [1.0, 1.2]


def test_image_sizes_are_parsed_with_a_clear_error():
    assert bench._size("450x600") == (450, 600)
    with pytest.raises(Exception, match="224x224"):
        bench._size("450,600")


def test_default_methods_are_the_registry_without_the_costly_ones():
    import flaxcam

    defaults = bench.registry_methods()
    assert {"cam", "gradcam", "gradcam++", "hirescam", "layercam"} <= set(defaults)
    assert not any(flaxcam.METHODS[m].batched for m in defaults)
    expected = [
        name
        for name, method in flaxcam.METHODS.items()
        if not method.batched and not method.attention_layers and name not in EXPENSIVE_METHODS
    ]
    assert defaults == expected
    assert "legrad" in flaxcam.METHODS and "legrad" not in defaults  # a ViT method: no CNN layer to time


def test_allocator_settings_reach_every_worker_env_unless_default():
    args = bench._resolve(bench.build_parser().parse_args(["peers"]))
    assert args.allocator == "tuned"
    assert bench._env(args, {"XLA_FLAGS": "--x"}) == {**bench.runner.TUNED_ALLOCATOR_ENV, "XLA_FLAGS": "--x"}
    default = bench._resolve(bench.build_parser().parse_args(["peers", "--allocator", "default"]))
    assert bench._env(default) == {}
    assert report.allocator_name(bench._env(args)) == "tuned" and report.allocator_name({}) == "default"


@pytest.mark.slow
def test_peers_on_split_cpu_devices_shard_the_forward_pass_too(tmp_path):
    bench.main(
        [
            "peers",
            "--models",
            "small_cnn",
            "--methods",
            "gradcam",
            "--size",
            "32",
            "40",
            "--batch",
            "4",
            "--rounds",
            "1",
            "--no-peers",
            "--cpu-devices",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    ok = [r for r in _rows(tmp_path / "peers_cpu.jsonl") if r["status"] == "ok"]
    assert [r["method"] for r in ok] == ["forward", "gradcam"]
    assert all(r["devices"] == 2 and "device_count=2" in r["env"]["XLA_FLAGS"] for r in ok)
    assert "split into 2 XLA device(s)" in (tmp_path / "peers_cpu.md").read_text()


def test_processes_mode_splits_the_cores_into_disjoint_sets():
    """``python -m benchmarks processes`` (the run itself takes minutes: measured, never run here)."""
    from benchmarks import processes

    assert processes.core_sets([0, 1], 2) == [[0], [1]] and processes.core_sets([0, 1, 2], 2) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="at least 3 cores"):
        processes.core_sets([0, 1], 3)
    args = bench.build_parser().parse_args(["processes", "--processes", "1", "2", "--images", "8"])
    assert args.command == "processes" and args.processes == [1, 2] and args.images == 8
