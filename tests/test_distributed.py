"""Multi-process runs for real: several local JAX processes (CPU devices, a coordinator on 127.0.0.1,
gloo collectives) started as subprocesses of the command line, compared with the single-process run.

Every subprocess has a timeout, so a hanging peer fails the test instead of blocking the suite."""

from __future__ import annotations

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

SIZE = (32, 32)
TIMEOUT = 120  # seconds any subprocess may run
REPO = Path(__file__).resolve().parent.parent
IGNORED = ("process",)  # which process wrote a row: the only column allowed to differ

pytestmark = pytest.mark.timeout(2 * TIMEOUT + 30)


def environment(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from flaxcam.cli import main; main()", *args]


def start(count: int, args: list[str], port: int | None = None, devices: int = 1) -> list[subprocess.Popen]:
    """``count`` processes of ``flaxcam ARGS`` joined through a coordinator on ``port``."""
    port = port or free_port()
    extra = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count), "--process-id", str(i)]
    return [
        subprocess.Popen(cli(*args, *(extra(i) if count > 1 else [])), env=environment(devices), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def assert_same_audit(out: Path, reference: Path) -> None:
    """Row for row the single-process audit (one manifest, complete, every image exactly once)."""
    assert table(out) == table(reference), "rows differ from the single-process audit"
    assert table(out, "errors") == table(reference, "errors")
    manifest, expected = store.read_manifest(out), store.read_manifest(reference)
    assert manifest["status"] == "complete" and manifest["counts"] == expected["counts"]
    indices = [row["index"] for row in table(out) + table(out, "errors")]
    assert np.array_equal(np.sort(indices), np.arange(16))


def test_two_processes_audit_equals_one(folder, bundle, single, tmp_path):
    out = tmp_path / "audit"
    results = finish(start(2, audit_args(folder, bundle, out)))
    assert all(code == 0 for code, _ in results), results
    assert_same_audit(out, single)
    writers = {name.split("-")[1] for name in store.read_manifest(out)["parts"]}
    assert writers == {"p00000", "p00001"}, writers  # both wrote parts, each under its own name
    assert set(store.read_rows(out)["process"].to_pylist()) == {0, 1}
    assert sorted(p.name for p in out.glob(".lock-p*")) == [".lock-p00000", ".lock-p00001"]


def test_process_id_out_of_range_is_refused_at_once(folder, bundle, tmp_path):
    args = audit_args(folder, bundle, tmp_path / "audit", "--coordinator", f"127.0.0.1:{free_port()}",
                      "--num-processes", "2", "--process-id", "2")
    result = subprocess.run(cli(*args), env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "--process-id must be in 0..1 (--num-processes 2), got 2" in result.stderr


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time():
    with pytest.raises(distributed.DistributedSetupError, match=r"not reachable within 1 s.*start process 0"):
        distributed.initialize(f"127.0.0.1:{free_port()}", 2, 1, timeout=1)
    with pytest.raises(distributed.DistributedSetupError, match="needs all of --coordinator"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(distributed.DistributedSetupError, match="HOST:PORT"):
        distributed.initialize("127.0.0.1", 2, 0)
    assert distributed.initialize() is False  # no flags: a single process, JAX untouched
