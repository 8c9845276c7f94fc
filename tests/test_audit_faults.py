"""Fault injection for the audit: a failed write (first part, last part, manifest, a real file-size
limit), kill -9 at several points, a second concurrent audit, a lost or foreign manifest, duplicated
indices, the output folder inside a ``folder:`` source, SQL reaching for other files, file permissions.

Each case ends with a clear message and no hang (60 s per test), and after the rerun every readable
image is in exactly one row and every unreadable one in the errors table (:func:`assert_exactly_once`).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxcam import audit, models
from flaxcam.audit import store
from flaxcam.cli import app
from flaxcam.imageio import Preprocessing
from tests import audit_helpers
from tests.helpers import subprocess_env

pytestmark = pytest.mark.timeout(60)
#: Tests that start fresh Python processes (JAX import and compilation each: about 10 s on an idle
#: machine, up to a minute on a loaded one) get twice the time.
SUBPROCESS_TIMEOUT = 120

SCRIPT = Path(__file__).parent / "audit_script.py"
ENV = subprocess_env()
LOCK = ".lock-p00000"
KW = {"preprocessing": audit_helpers.PREPROCESSING, "progress": False}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def model_and_variables():
    return audit_helpers.make_model()


def assert_exactly_once(out: Path, count: int, bad: tuple[int, ...] | None = None) -> None:
    """Every readable image of the ``count``-image source in exactly one row, every unreadable one in
    exactly one error row, a complete manifest that counts them, no temporary file left."""
    bad = audit_helpers.bad_indices(count) if bad is None else bad
    rows, errors = store.read_rows(out, ["index"])["index"].to_pylist(), store.read_errors(out)["index"].to_pylist()
    assert sorted(rows) == sorted(set(range(count)) - set(bad))
    assert sorted(errors) == sorted(bad)
    manifest = store.read_manifest(out)
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"total": count, "rows": len(rows), "errors": len(errors)}
    assert not list(out.glob(".*.tmp"))


def fail_replace(monkeypatch, name_prefix: str, *, skip: int = 0, content: str | None = None) -> list[str]:
    """Make the atomic rename of files named ``name_prefix*`` raise ``ENOSPC`` (after ``skip`` good
    ones; only when the new file contains ``content``, if given). Returns the names it refused."""
    real = os.replace
    refused: list[str] = []
    seen = [0]

    def replace(src, dst, *args, **kwargs):
        name = Path(dst).name
        if name.startswith(name_prefix) and (content is None or content in Path(src).read_text(errors="replace")):
            seen[0] += 1
            if seen[0] > skip:
                refused.append(name)
                raise ENOSPC
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return refused


# --------------------------------------------------------------------------- a failed write


@pytest.mark.parametrize(
    ("case", "count", "rows_per_part", "prefix", "skip", "content", "message"),
    [
        ("first part", 150, 32, "part-", 0, None, "cannot write part"),  # fails mid-stream
        ("last part", 20, 4096, "part-", 0, None, "cannot write part"),  # the only flush, at close
        ("manifest", 150, 32, store.MANIFEST, 0, '"status": "complete"', "cannot write manifest"),
    ],
)
def test_write_failure_raises_promptly_and_rerun_completes(
    tmp_path, monkeypatch, model_and_variables, case, count, rows_per_part, prefix, skip, content, message
):
    model, variables = model_and_variables
    source = audit_helpers.make_source(count)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        refused = fail_replace(patch, prefix, skip=skip, content=content)
        start = time.monotonic()
        with pytest.raises(OSError, match=f"{message} .*: No space left on device") as caught:
            audit.run(source, model, variables, out, batch_size=32, rows_per_part=rows_per_part, **KW)
    assert refused and refused[0] in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert time.monotonic() - start < 40
    assert not list(out.glob(".*.tmp"))  # the failed file left nothing behind
    assert not (out / LOCK).read_text()  # the lock was released

    result = audit.run(source, model, variables, out, batch_size=32, rows_per_part=rows_per_part, **KW)
    assert result.complete
    assert_exactly_once(out, count)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "model.msgpack"
    kwargs = {"num_classes": 2, "features": [8, 16]}
    model = models.create_model("small_cnn", **kwargs)
    variables = models.init_variables(model, (1, 32, 32, 3), seed=3)
    meta = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["cats", "dogs"]}
    models.save_bundle(path, model_name="small_cnn", model_kwargs=kwargs, variables=variables, meta=meta)
    return path


def make_folder(root: Path) -> Path:
    """cats/0-3.png, dogs/0-3.png and one unreadable dogs/broken.png (id order: index 8)."""
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "dogs" / "broken.png").write_text("not an image")
    return root


FOLDER_COUNT = 9


def folder_bad(root: Path) -> tuple[int, ...]:
    """The index of the unreadable file in the folder source."""
    from flaxcam.data import ImageFolderSource

    ids = ImageFolderSource(root).ids
    return tuple(i for i, name in enumerate(ids) if name.endswith("broken.png"))


def test_cli_disk_full_is_one_line_error(tmp_path, monkeypatch, bundle):
    folder = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["audit", f"folder:{folder}", "--out", str(out), "--weights", str(bundle), "--batch-size", "4"]
    with monkeypatch.context() as patch:
        fail_replace(patch, "part-")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]  # (others: progress bar)
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write part {out}/part-p00000-")
    assert lines[0].endswith(": No space left on device") and "Traceback" not in result.output
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "(complete)" in result.output, result.output
    assert_exactly_once(out, FOLDER_COUNT, folder_bad(folder))


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_cli_on_a_real_file_size_limit_then_rerun(tmp_path, bundle):
    """No monkeypatch: the kernel refuses the write (RLIMIT_FSIZE, like a full disk); the command ends
    with one ``error:`` line and exit 2 within seconds, and the rerun without the limit completes."""
    folder = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "flaxcam.cli",
        "audit",
        f"folder:{folder}",
        "--out",
        str(out),
        "--weights",
        str(bundle),
        "--batch-size",
        "4",
    ]
    limited = subprocess.run(
        command,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
        preexec_fn=_limit_file_size(1024),
    )
    assert limited.returncode == 2, limited.stderr[-3000:]
    error_lines = [line for line in limited.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert error_lines[0].startswith("error: cannot write ") and error_lines[0].endswith(": File too large")
    assert not list(out.glob(".*.tmp"))
    result = CliRunner().invoke(app, command[3:])
    assert result.exit_code == 0, result.output
    assert_exactly_once(out, 9, folder_bad(folder))


# --------------------------------------------------------------------------- kill -9 and a second audit


def lock_holder(out: Path) -> dict:
    try:
        return json.loads((out / LOCK).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def start_holding_audit(out: Path, count: int, parts: int) -> subprocess.Popen:
    """An audit in a subprocess that stops before its next batch once ``parts`` parts are written, and
    creates ``OUT.held`` (``tests/audit_script.py hold``); it goes on once ``OUT.release`` exists."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "hold", str(out), str(count), str(parts)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_until_held(process: subprocess.Popen, out: Path) -> None:
    assert process.stderr is not None  # started with stderr=subprocess.PIPE
    held = Path(f"{out}.held")
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT - 30
    while time.monotonic() < deadline and process.poll() is None and not held.exists():
        time.sleep(0.02)
    assert process.poll() is None, f"the audit ended too early: {process.stderr.read().decode()[-2000:]}"
    assert held.exists(), "the audit did not reach the point to hold at in time"


@pytest.mark.slow
@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
@pytest.mark.parametrize(
    "parts", [0, 1, 3], ids=["locked, nothing written", "after the first part", "after three parts"]
)
def test_kill_minus_9_then_rerun_takes_over_the_lock(tmp_path, model_and_variables, parts):
    count = 640
    out = tmp_path / "out"
    process = start_holding_audit(out, count, parts)
    try:
        wait_until_held(process, out)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert lock_holder(out).get("pid") == process.pid  # the killed process's lock is left behind
    assert len(store.part_files(out, "part")) >= parts
    partial = len(store.done_indices(out))
    assert partial < count

    model, variables = model_and_variables
    result = audit.run(audit_helpers.make_source(count), model, variables, out, batch_size=64, rows_per_part=128, **KW)
    assert result.complete and result.processed == count - partial
    assert_exactly_once(out, count)
    assert lock_holder(out) == {}  # taken over, then released


@pytest.mark.slow
@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_second_concurrent_audit_refuses_naming_the_holder(tmp_path):
    count = 480
    out = tmp_path / "out"
    first = start_holding_audit(out, count, 1)
    try:
        wait_until_held(first, out)
        second = subprocess.run(
            [sys.executable, str(SCRIPT), "run", str(out), str(count)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
        )
    finally:
        Path(f"{out}.release").touch()
        first_rc = first.wait(timeout=SUBPROCESS_TIMEOUT)
    assert second.returncode != 0
    message = second.stderr.strip().splitlines()[-1]
    assert f"is in use by another audit (PID {first.pid} on host {socket.gethostname()}" in message, second.stderr[
        -2000:
    ]
    assert first_rc == 0, first.stderr.read().decode()[-2000:]
    assert_exactly_once(out, count)


def test_cli_refuses_a_locked_folder(tmp_path, bundle):
    from flaxcam.audit.lock import FolderLock

    folder = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["audit", f"folder:{folder}", "--out", str(out), "--weights", str(bundle)]
    out.mkdir()
    with FolderLock(out):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(
        f"error: {out} is in use by another audit (PID {os.getpid()} on host {socket.gethostname()}, since "
    )
    assert line.endswith("); wait for it to finish, or write to another --out folder")
    assert not store.part_files(out) and not (out / store.MANIFEST).exists()
    assert CliRunner().invoke(app, args).exit_code == 0  # released: the next run proceeds
    assert_exactly_once(out, FOLDER_COUNT, folder_bad(folder))


def test_lock_is_exclusive_and_records_a_dead_holder(tmp_path):
    from flaxcam.audit.lock import FolderLock

    first = FolderLock(tmp_path).acquire()
    with pytest.raises(RuntimeError, match=f"PID {os.getpid()} on host {socket.gethostname()}"):
        FolderLock(tmp_path).acquire()
    other_index = FolderLock(tmp_path, process=1).acquire()  # one lock per process index
    other_index.release()
    first.release()
    # A holder killed without releasing: its details stay in the file, its flock is gone with it.
    (tmp_path / LOCK).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "process_index": 0}))
    with FolderLock(tmp_path) as taken:
        assert taken.taken_over == {"pid": 999999, "host": "elsewhere", "process_index": 0}
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert (tmp_path / LOCK).read_text() == ""


# --------------------------------------------------------------------------- manifests and parts


def test_lost_manifest_refuses_other_settings_and_is_rebuilt(tmp_path, model_and_variables):
    model, variables = model_and_variables
    count = 150
    source = audit_helpers.make_source(count)
    out = tmp_path / "out"
    audit.run(source, model, variables, out, batch_size=32, rows_per_part=40, limit=100, **KW)
    before = store.read_manifest(out)
    (out / store.MANIFEST).unlink()

    other = audit_helpers.make_model(seed=1)[1]
    with pytest.raises(ValueError, match=r"parts were written with other settings \(model_fingerprint: '") as caught:
        audit.run(source, model, other, out, batch_size=32, method="gradcam", **KW)
    assert "method: 'cam' -> 'gradcam'" in str(caught.value) and "--no-resume" in str(caught.value)
    assert not (out / store.MANIFEST).exists() and len(store.done_indices(out)) == 100  # nothing adopted

    result = audit.run(source, model, variables, out, batch_size=32, rows_per_part=40, **KW)
    assert result.complete and result.processed == 50
    assert_exactly_once(out, count)
    rebuilt = store.read_manifest(out)
    for name in ("model_fingerprint", "method", "layer", "class_names", "low_res_shape", "source_length"):
        assert rebuilt[name] == before[name], name

    (out / store.MANIFEST).unlink()  # lost after completion: rebuilt without running anything
    result = audit.run(source, model, variables, out, batch_size=32, **KW)
    assert result.complete and result.processed == 0
    assert store.read_manifest(out)["low_res_shape"] == before["low_res_shape"]
    assert_exactly_once(out, count)


def test_foreign_manifest_is_refused_until_removed(tmp_path, model_and_variables):
    model, variables = model_and_variables
    other = audit_helpers.make_model(seed=1)[1]
    count = 40
    source = audit_helpers.make_source(count)
    audit.run(source, model, variables, tmp_path / "a", batch_size=32, **KW)
    audit.run(source, model, other, tmp_path / "b", batch_size=32, **KW)
    shutil.copy(tmp_path / "b" / store.MANIFEST, tmp_path / "a" / store.MANIFEST)  # b's manifest, a's parts

    with pytest.raises(ValueError, match="parts were written with other settings") as caught:
        audit.run(source, model, other, tmp_path / "a", batch_size=32, **KW)  # as the manifest says
    assert "model_fingerprint" in str(caught.value)
    with pytest.raises(ValueError, match=f"its parts match this run: delete {tmp_path / 'a' / store.MANIFEST}"):
        audit.run(source, model, variables, tmp_path / "a", batch_size=32, **KW)  # as the parts say
    (tmp_path / "a" / store.MANIFEST).unlink()
    assert audit.run(source, model, variables, tmp_path / "a", batch_size=32, **KW).complete
    assert_exactly_once(tmp_path / "a", count)
    assert store.read_manifest(tmp_path / "a")["model_fingerprint"] == audit.runner.model_fingerprint(variables)


def test_corrupt_manifest_names_the_file(tmp_path, model_and_variables):
    model, variables = model_and_variables
    source = audit_helpers.make_source(20)
    out = tmp_path / "out"
    audit.run(source, model, variables, out, **KW)
    (out / store.MANIFEST).write_text('{"status": "compl')
    with pytest.raises(ValueError, match=f"{out / store.MANIFEST} is corrupt .*delete it and rerun"):
        audit.run(source, model, variables, out, **KW)


def test_duplicated_indices_are_repaired_on_resume(tmp_path, model_and_variables):
    """A part copied under another name (what two concurrent runs used to leave) is repaired: every
    index ends in exactly one row."""
    model, variables = model_and_variables
    count = 150
    source = audit_helpers.make_source(count)
    out = tmp_path / "out"
    audit.run(source, model, variables, out, batch_size=32, rows_per_part=40, limit=120, **KW)
    parts = store.part_files(out, "part")
    shutil.copy(parts[1], out / store.part_name("part", 0, 900))
    shutil.copy(store.part_files(out, "errors")[0], out / store.part_name("errors", 0, 901))
    with pytest.warns(UserWarning, match="removed indices recorded twice from 2 part"):
        result = audit.run(source, model, variables, out, batch_size=32, rows_per_part=40, **KW)
    assert result.complete and result.processed == 30
    assert_exactly_once(out, count)


def test_out_inside_a_folder_source_is_not_data(tmp_path, bundle):
    """``--out DATA/audit``: the audit folder is never a class, so a resumed run keeps the labels; the
    class list is part of the resume settings."""
    folder = make_folder(tmp_path / "data")
    out = folder / "audit"
    args = ["audit", f"folder:{folder}", "--out", str(out), "--weights", str(bundle), "--batch-size", "2"]
    first = CliRunner().invoke(app, [*args, "--limit", "3"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "(complete)" in second.output, second.output
    assert_exactly_once(out, FOLDER_COUNT, folder_bad(folder))
    rows = store.read_rows(out, ["id", "label"]).to_pydict()
    assert rows["label"] == [0 if name.startswith("cats/") else 1 for name in rows["id"]]
    assert store.read_manifest(out)["class_names"] == ["cats", "dogs"]

    model, variables, _ = models.load_bundle(bundle)
    preprocessing = Preprocessing((32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"class_names: \['cats', 'dogs'\] -> \['cat', 'dog'\]"):
        audit.run(
            f"folder:{folder}",
            model,
            variables,
            out,
            preprocessing=preprocessing,
            class_names=["cat", "dog"],
            progress=False,
        )


# --------------------------------------------------------------------------- query and permissions


def test_query_cannot_reach_other_files_unless_allowed(tmp_path, model_and_variables):
    model, variables = model_and_variables
    out = tmp_path / "out"
    audit.run(audit_helpers.make_source(20), model, variables, out, **KW)
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    copy = tmp_path / "copy.csv"
    runner = CliRunner()
    for sql in (
        f"SELECT * FROM read_csv('{secret}')",
        f"COPY (SELECT * FROM audit) TO '{copy}'",
        "SET enable_external_access = true",
    ):
        result = runner.invoke(app, ["query", str(out), sql])
        assert result.exit_code != 0 and "hunter2" not in result.output, (sql, result.output)
    assert not copy.exists()
    result = runner.invoke(app, ["query", str(out), "SELECT count(*) AS n FROM audit"])
    assert result.exit_code == 0 and result.output.split() == ["n", str(20 - len(audit_helpers.bad_indices(20)))]
    result = runner.invoke(app, ["query", str(out), f"SELECT * FROM read_csv('{secret}')", "--allow-files"])
    assert result.exit_code == 0 and "hunter2" in result.output, result.output


def test_files_written_get_the_usual_permissions(tmp_path, model_and_variables, bundle):
    """A model bundle, the audit's parts, manifest and report: mode 0o666 less the umask (0o644 here)."""
    model, variables = model_and_variables
    previous = os.umask(0o022)
    try:
        models.save_bundle(
            tmp_path / "b.msgpack",
            model_name="small_cnn",
            model_kwargs={"num_classes": 10, "features": [8, 16]},
            variables=variables,
        )
        out = tmp_path / "out"
        audit.run(audit_helpers.make_source(20), model, variables, out, **KW)
        report = audit.write_report(out, tmp_path / "report.html")
    finally:
        os.umask(previous)
    written = [
        tmp_path / "b.msgpack",
        out / store.MANIFEST,
        report,
        *store.part_files(out, "part"),
        *store.part_files(out, "errors"),
    ]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {path.name: "0o644" for path in written}


# --------------------------------------------------------------------------- several processes (jax.distributed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_distributed(out: Path, count: int, processes: int = 2) -> list[subprocess.CompletedProcess]:
    """``processes`` local processes of one audit (CPU, coordinator on 127.0.0.1), run to the end."""
    port = _free_port()
    started = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "distributed", str(out), str(count), str(port), str(processes), str(i)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    try:
        outputs = [process.communicate(timeout=2 * SUBPROCESS_TIMEOUT - 30) for process in started]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(started, outputs)]


@pytest.mark.slow
@pytest.mark.timeout(2 * SUBPROCESS_TIMEOUT)
def test_two_processes_refuse_together_when_one_cannot_lock(tmp_path):
    """With the lock of process 1 held elsewhere, both processes of a two-process audit refuse (process
    0, which got its own lock, included) and write nothing; no process waits for the other forever."""
    from flaxcam.audit.lock import FolderLock

    out = tmp_path / "two"
    out.mkdir()
    with FolderLock(out, process=1):
        refused = run_distributed(out, 100)
    assert all(result.returncode != 0 for result in refused), [r.stderr[-1500:] for r in refused]
    assert f"is in use by another audit (PID {os.getpid()} on host" in refused[1].stderr
    assert "process(es) 1 of this run could not lock it" in refused[0].stderr
    assert not store.part_files(out) and not (out / store.MANIFEST).exists()


@pytest.mark.slow
@pytest.mark.timeout(2 * SUBPROCESS_TIMEOUT)
def test_two_processes_write_one_audit_equal_to_one_process(tmp_path, model_and_variables):
    """Two processes (``jax.distributed``) write one audit, each its own shard into its own parts
    (``part-p00000-*``, ``part-p00001-*``: no name is written by both), equal row for row to a
    one-process audit."""
    count = 100
    out = tmp_path / "two"
    results = run_distributed(out, count)
    assert all(result.returncode == 0 for result in results), [r.stderr[-1500:] for r in results]
    assert_exactly_once(out, count)
    assert {path.name.split("-")[1] for path in store.part_files(out, "part")} == {"p00000", "p00001"}
    for path in [*store.part_files(out, "part"), *store.part_files(out, "errors")]:
        shard = audit.shard_indices(count, int(path.name.split("-")[1][1:]), 2)
        assert set(store.part_indices(path).tolist()) <= set(shard.tolist())

    model, variables = model_and_variables
    audit.run(audit_helpers.make_source(count), model, variables, tmp_path / "one", batch_size=64, **KW)
    two, one = store.read_rows(out).to_pydict(), store.read_rows(tmp_path / "one").to_pydict()
    for name in ("index", "id", "pred", "target", "topk_classes", "box_x0", "box_y0", "box_x1", "box_y1"):
        assert two[name] == one[name], name
    np.testing.assert_allclose(
        store.decode_low_res(two["low_res"], (16, 16)), store.decode_low_res(one["low_res"], (16, 16)), atol=1e-3
    )


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from flaxcam.files import atomic_write, atomic_write_text

    path = atomic_write_text(tmp_path / "a.json", "old")

    def fail_halfway(handle) -> None:
        handle.write(b"half of the new cont")
        raise ENOSPC

    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(path, fail_halfway)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
