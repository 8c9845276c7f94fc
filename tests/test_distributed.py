"""Multi-process runs for real: several local JAX processes (CPU devices, a coordinator on 127.0.0.1,
gloo collectives) started as subprocesses of the command line, compared with the single-process run.

Every subprocess has a timeout, so a hanging peer fails the test instead of blocking the suite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxcam import distributed, models
from flaxcam.audit import store
from tests.helpers import subprocess_env

SIZE = (32, 32)
TIMEOUT = 120  # seconds any subprocess may run
REPO = Path(__file__).resolve().parent.parent
IGNORED = ("process",)  # which process wrote a row: the only column allowed to differ

pytestmark = pytest.mark.timeout(2 * TIMEOUT + 30)


def environment(devices: int = 1) -> dict[str, str]:
    return subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from flaxcam.cli import main; main()", *args]


def start(
    count: int, args: list[str], port: int | None = None, devices: int = 1, own: list[list[str]] | None = None
) -> list[subprocess.Popen]:
    """``count`` processes of ``flaxcam ARGS`` joined through a coordinator on ``port``; process ``i``
    also gets ``own[i]`` (e.g. a setting that differs between processes)."""
    port = port or free_port()
    extra = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count), "--process-id", str(i)]
    return [
        subprocess.Popen(
            cli(*args, *(own[i] if own else []), *(extra(i) if count > 1 else [])),
            env=environment(devices),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(count)
    ]


def finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """(exit code, output) of each process; any still running at ``timeout`` is killed (a test failure)."""
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            output, _ = process.communicate()
            pytest.fail(f"a process hung past {timeout} s:\n{output[-3000:]}")
        results.append((process.returncode, output))
    return results


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "model.msgpack"
    kwargs = {"num_classes": 2, "features": [8, 16]}
    model = models.create_model("small_cnn", **kwargs)
    variables = models.init_variables(model, (1, *SIZE, 3), seed=3)
    meta = {"input_size": list(SIZE), "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["cats", "dogs"]}
    models.save_bundle(path, model_name="small_cnn", model_kwargs=kwargs, variables=variables, meta=meta)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """16 images of mixed sizes in two classes, 3 of them unreadable, spread over both shards."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir()
        for i in range(8):
            h, w = rng.integers(20, 64, 2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    (root / "cats" / "03.png").write_text("not an image")
    (root / "dogs" / "05.png").write_bytes((root / "dogs" / "06.png").read_bytes()[:60])
    (root / "dogs" / "07.png").write_bytes(b"")
    return root


def audit_args(folder: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["audit", f"folder:{folder}", "--out", str(out), "--weights", str(bundle), "--batch-size", "4", *extra]


def table(out: Path, kind: str = "part") -> list[dict]:
    """The audit's rows sorted by index, without :data:`IGNORED` columns, NaN spelled None (so that
    equal rows compare equal)."""
    read = store.read_rows if kind == "part" else store.read_errors
    rows = read(out).sort_by("index").to_pylist()
    nan_free = lambda value: None if isinstance(value, float) and value != value else value
    return [{name: nan_free(value) for name, value in row.items() if name not in IGNORED} for row in rows]


@pytest.fixture(scope="module")
def single(folder, bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "audit"
    [(code, output)] = finish(start(1, audit_args(folder, bundle, out)))
    assert code == 0, output
    assert "13 images, 3 unreadable, of 16 (complete)" in output
    return out


def assert_same_audit(out: Path, reference: Path, count: int = 16) -> None:
    """Row for row the single-process audit (one manifest, complete, every image exactly once)."""
    assert table(out) == table(reference), "rows differ from the single-process audit"
    assert table(out, "errors") == table(reference, "errors")
    manifest, expected = store.read_manifest(out), store.read_manifest(reference)
    assert manifest["status"] == "complete" and manifest["counts"] == expected["counts"]
    indices = [row["index"] for row in table(out) + table(out, "errors")]
    assert np.array_equal(np.sort(indices), np.arange(count))


def test_two_processes_audit_equals_one(folder, bundle, single, tmp_path):
    """Also a restart with another process count: one process audits 5 images, then two processes
    finish the audit (each takes its shard of the images still to do)."""
    from typer.testing import CliRunner

    from flaxcam.cli import app

    out = tmp_path / "audit"
    first = CliRunner().invoke(app, audit_args(folder, bundle, out, "--limit", "5"))
    assert first.exit_code == 0 and "(incomplete)" in first.output, first.output
    results = finish(start(2, audit_args(folder, bundle, out)))
    assert all(code == 0 for code, _ in results), results
    assert_same_audit(out, single)
    writers = {name.split("-")[1] for name in store.read_manifest(out)["parts"]}
    assert writers == {"p00000", "p00001"}, writers  # both wrote parts, each under its own name
    assert set(store.read_rows(out)["process"].to_pylist()) == {0, 1}
    assert store.read_manifest(out)["process_count"] == 2
    assert sorted(p.name for p in out.glob(".lock-p*")) == [".lock-p00000", ".lock-p00001"]


@pytest.mark.slow  # three processes on two cores: 71 s on the loaded 2-core machine (load average 11)
def test_three_processes_audit_equals_one(folder, bundle, single, tmp_path):
    """3 processes, shards of 6, 5 and 5 of the 16 images (unreadable ones among them): row for row the
    single-process audit."""
    out = tmp_path / "audit"
    results = finish(start(3, audit_args(folder, bundle, out)))
    assert all(code == 0 for code, _ in results), [output[-2000:] for _, output in results]
    assert_same_audit(out, single)
    assert set(store.read_rows(out)["process"].to_pylist()) == {0, 1, 2}


@pytest.mark.parametrize("command", ["audit", "train"])
def test_process_id_out_of_range_is_refused_at_once(folder, bundle, tmp_path, command):
    first = (
        audit_args(folder, bundle, tmp_path / "audit") if command == "audit" else train_args(folder, tmp_path / "run")
    )
    args = [
        *first,
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--num-processes",
        "2",
        "--process-id",
        "2",
    ]
    result = subprocess.run(cli(*args), env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "--process-id must be in 0..1 (--num-processes 2), got 2" in result.stderr


def test_processes_with_different_settings_all_refuse(folder, bundle, tmp_path):
    out = tmp_path / "audit"
    processes = start(2, audit_args(folder, bundle, out), own=[["--method", "cam"], ["--method", "gradcam"]])
    for code, output in finish(processes):
        assert code == 2, output
        assert "process(es) 1 of this run have other settings than process 0" in output, output
    assert not store.part_files(out, "part")


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time():
    with pytest.raises(distributed.DistributedSetupError, match=r"not reachable within 1 s.*start process 0"):
        distributed.initialize(f"127.0.0.1:{free_port()}", 2, 1, timeout=1)
    with pytest.raises(distributed.DistributedSetupError, match="needs all of --coordinator"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(distributed.DistributedSetupError, match="HOST:PORT"):
        distributed.initialize("127.0.0.1", 2, 0)
    assert distributed.initialize() is False  # no flags: a single process, JAX untouched


SCRIPT = str(REPO / "tests" / "distributed_script.py")
COUNT = 24  # generated images of the kill test (tests/audit_helpers.py: index 7 unreadable)


def start_script(out: Path, count: int, pause: float) -> list[subprocess.Popen]:
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, SCRIPT, "audit", str(out), str(count), port, "2", str(i), str(pause)],
            env=environment(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT + 30)  # two runs of two processes, each bounded by TIMEOUT
def test_kill_minus_9_of_one_process_then_rerun_completes_exactly_once(tmp_path):
    from flaxcam import audit
    from tests import audit_helpers

    reference = tmp_path / "single"
    model, variables = audit_helpers.make_model()
    audit.run(
        audit_helpers.make_source(COUNT),
        model,
        variables,
        reference,
        preprocessing=audit_helpers.PREPROCESSING,
        batch_size=8,
        rows_per_part=8,
        progress=False,
    )

    out = tmp_path / "audit"
    processes = start_script(out, COUNT, pause=1.0)
    started = Path(f"{out}.started-p1")
    deadline = time.monotonic() + TIMEOUT
    while not started.exists() and time.monotonic() < deadline and processes[1].poll() is None:
        time.sleep(0.1)
    assert started.exists(), finish(processes)
    time.sleep(np.random.default_rng().uniform(0, 0.5))  # a random point of its first pause
    os.kill(processes[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    [(survivor_code, survivor_output), (killed_code, _)] = finish(processes)
    # the survivor does not hang: it aborts once the dead peer misses its heartbeats (10 s here)
    assert killed_code == -signal.SIGKILL and survivor_code != 0, survivor_output[-2000:]
    assert "Task 1 heartbeat timeout" in survivor_output, survivor_output[-2000:]
    assert time.monotonic() - killed_at < 60
    assert store.read_manifest(out)["status"] != "complete"

    results = finish(start_script(out, COUNT, pause=0.0))  # the same two commands again
    assert all(code == 0 for code, _ in results), results
    assert_same_audit(out, reference, COUNT)


def test_global_mesh_explain_over_two_processes_equals_one_process(tmp_path):
    """2 processes x 2 CPU devices: a 4-device global mesh, each process feeding its half of the batch
    (jax.make_array_from_process_local_data); the gathered result equals one process's explain."""
    import flaxcam
    from tests import audit_helpers, distributed_script

    out, port = tmp_path / "maps.npz", str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, SCRIPT, "explain", str(out), port, "2", str(i)],
            env=environment(devices=2),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    results = finish(processes)
    assert all(code == 0 for code, _ in results), results
    got = np.load(out)
    assert int(got["devices"]) == 4 and int(got["local_devices"]) == 2

    model, variables = audit_helpers.make_model()
    expected = flaxcam.explain(model, variables, distributed_script.explain_images(), method="gradcam", top_k=2)
    np.testing.assert_array_equal(got["targets"], np.asarray(expected.targets))
    for name in ("maps", "low_res", "probabilities"):
        np.testing.assert_allclose(got[name], np.asarray(getattr(expected, name)), rtol=0, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------- training

TRAIN_TIMEOUT = 90  # seconds a training subprocess may run (a tiny CNN, 6 steps)


def train_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """6 steps of a tiny CNN on the 16 images of ``folder`` (3 unreadable: weight 0), global batches of 8,
    with flips and shifts, a checkpoint every 2 steps, evaluated on the same folder after each epoch."""
    return [
        "train",
        f"folder:{folder}",
        "--out",
        str(out),
        "--model",
        "small_cnn",
        "--model-kwargs",
        '{"features": [4, 8]}',
        "--size",
        "16,16",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--learning-rate",
        "0.01",
        "--flip",
        "--shift",
        "2",
        "--checkpoint-every",
        "2",
        "--seed",
        "3",
        "--val",
        f"folder:{folder}",
        *extra,
    ]


def trained_leaves(out: Path) -> list[np.ndarray]:
    _model, variables, meta = models.load_bundle(out / "model.msgpack")
    assert meta["steps"] == 6
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]


def train_in_processes(count: int, args: list[str], devices: int = 2) -> list[str]:
    results = finish(start(count, args, devices=devices), timeout=TRAIN_TIMEOUT)
    assert all(code == 0 for code, _ in results), [output[-3000:] for _, output in results]
    return [output for _, output in results]


@pytest.fixture(scope="module")
def trained_two(folder, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (2 CPU devices each: a 4-device global mesh)."""
    out = tmp_path_factory.mktemp("train2") / "run"
    outputs = train_in_processes(2, train_args(folder, out))
    assert "trained 6 steps" in outputs[0], outputs[0][-2000:]
    return out


@pytest.mark.timeout(TRAIN_TIMEOUT + 60)
def test_two_process_training_equals_one_process(folder, trained_two, tmp_path):
    """Each process reads half of every global batch; XLA averages the gradients over the 4 devices of
    both processes. The parameters equal those of one process on the same global batches."""
    from typer.testing import CliRunner

    from flaxcam.cli import app

    single = tmp_path / "single"
    result = CliRunner().invoke(app, train_args(folder, single))
    assert result.exit_code == 0, result.output
    for got, expected in zip(trained_leaves(trained_two), trained_leaves(single), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (trained_two / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
    assert len(json.loads((trained_two / "errors.json").read_text())) == 3  # both shards' errors
    history, expected = (json.loads((out / "history.json").read_text()) for out in (trained_two, single))
    assert [h["eval_count"] for h in history] == [13] * 3  # the 3 unreadable images excluded
    for got_entry, expected_entry in zip(history, expected, strict=True):
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            assert abs(got_entry[key] - expected_entry[key]) < 1e-4, (key, got_entry, expected_entry)


@pytest.mark.slow
@pytest.mark.timeout(2 * TRAIN_TIMEOUT + 60)
def test_resumed_two_process_training_equals_uninterrupted(folder, trained_two, tmp_path):
    """Stopped mid-epoch after step 3 (a checkpoint written by process 0 alone), then the same two
    commands again: every process restores step 3 and the run ends with the uninterrupted parameters."""
    out = tmp_path / "run"
    outputs = train_in_processes(2, train_args(folder, out, "--stop-after-step", "3"))
    assert "stopped after step 3" in outputs[0], outputs[0][-2000:]
    assert not (out / "model.msgpack").exists()
    outputs = train_in_processes(2, train_args(folder, out))
    assert "resuming from the checkpoint of step 3" in outputs[0], outputs[0][-2000:]
    for got, expected in zip(trained_leaves(out), trained_leaves(trained_two), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(TRAIN_TIMEOUT + 30)
def test_training_processes_with_different_settings_all_refuse(folder, tmp_path):
    out = tmp_path / "run"
    processes = start(2, train_args(folder, out), own=[["--learning-rate", "0.01"], ["--learning-rate", "0.02"]])
    for code, output in finish(processes, timeout=TRAIN_TIMEOUT):
        assert code == 2, output[-2000:]
        assert "process(es) 1 of this run have other settings than process 0" in output, output[-2000:]
    assert not (out / "checkpoints").exists()
