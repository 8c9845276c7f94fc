"""Every user error of the command line is ONE line ``error: ...`` on stderr, exit status 2, no
traceback: a table of (subcommand, bad argument, what the line must say), run in-process with typer's
CliRunner, plus a few through a real subprocess (the console entry point)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxcam import models
from flaxcam.cli import app

SIZE = (16, 16)
NAMES = ["a", "b", "c", "d"]
KWARGS = {"num_classes": 4, "features": [4, 8]}


def _bundle(path: Path, *, kwargs=None, variables_kwargs=None, names=NAMES) -> Path:
    model = models.create_model("small_cnn", **(variables_kwargs or KWARGS))
    variables = models.init_variables(model, (1, *SIZE, 3), seed=0)
    meta = {"input_size": list(SIZE), "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": names}
    models.save_bundle(path, model_name="small_cnn", model_kwargs=kwargs or KWARGS, variables=variables, meta=meta)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    data = root / "data"
    for label in ("cats", "dogs"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(data / label / f"{i}.png")
    (root / "a_file.txt").write_text("not a folder")
    (root / "three_names.txt").write_text("x\ny\nz\n")
    (root / "a_folder").mkdir()
    paths = {
        "root": root,
        "image": data / "cats" / "0.png",
        "data": data,
        "file": root / "a_file.txt",
        "folder": root / "a_folder",
        "three_names": root / "three_names.txt",
        "bundle": _bundle(root / "model.msgpack"),
        # kwargs say 16 channels in conv1, the variables have 4
        "mismatched": _bundle(root / "mismatched.msgpack", kwargs={"num_classes": 4, "features": [16, 8]}),
        "two_names": _bundle(root / "two_names.msgpack", names=["a", "b"]),
    }
    audit = root / "audit"
    result = CliRunner().invoke(
        app, ["audit", str(data), "--out", str(audit), "--weights", str(paths["bundle"]), "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    paths["audit"] = audit
    corrupt = root / "corrupt_manifest"
    shutil.copytree(audit, corrupt)
    (corrupt / "manifest.json").write_text('{"version": 1, "class_')
    paths["corrupt_manifest"] = corrupt
    truncated = root / "truncated_part"
    shutil.copytree(audit, truncated)
    part = min(truncated.rglob("*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    paths["truncated_part"] = truncated
    return paths


#: A place that cannot be written even by root.
READ_ONLY = "/proc/flaxcam-cannot-write-here"

#: (id, arguments with {placeholders} from the files fixture, text the error line must contain)
CASES = [
    ("explain-out-file", "explain {image} --weights {bundle} --out {file}", "is a file, not a folder"),
    ("explain-out-read-only", f"explain {{image}} --weights {{bundle}} --out {READ_ONLY}", "cannot write there"),
    (
        "explain-json-folder",
        "explain {image} --weights {bundle} --out {folder} --json {folder}",
        "is a folder; give a file name",
    ),
    (
        "explain-json-under-file",
        "explain {image} --weights {bundle} --out {folder} --json {file}/x.json",
        "is a file, not a folder",
    ),
    (
        "explain-json-read-only",
        f"explain {{image}} --weights {{bundle}} --out {{folder}} --json {READ_ONLY}/s.json",
        "cannot write there",
    ),
    ("explain-batch-size-0", "explain {image} --weights {bundle} --out {folder} --batch-size 0", "--batch-size"),
    (
        "explain-batch-size-negative",
        "explain {image} --weights {bundle} --out {folder} --batch-size -1",
        "--batch-size",
    ),
    ("explain-top-k-0", "explain {image} --weights {bundle} --out {folder} --top-k 0", "--top-k"),
    (
        "explain-top-k-too-large",
        "explain {image} --weights {bundle} --out {folder} --top-k 5",
        "the model has 4 classes",
    ),
    (
        "explain-unknown-method",
        "explain {image} --weights {bundle} --out {folder} --method nope",
        "unknown method 'nope'; valid methods: ablationcam",
    ),
    ("explain-layer-123", "explain {image} --weights {bundle} --out {folder} --layer 123", "unknown layer '123'"),
    (
        "explain-missing-weights",
        "explain {image} --weights {root}/absent.msgpack --out {folder}",
        "absent.msgpack: not a file",
    ),
    (
        "explain-bundle-variables-mismatch",
        "explain {image} --weights {mismatched} --out {folder}",
        "do not match the model",
    ),
    (
        "explain-bundle-too-few-names",
        "explain {image} --weights {two_names} --out {folder}",
        "has 2 class names but its model has 4 outputs",
    ),
    (
        "explain-class-names-mismatch",
        "explain {image} --weights {bundle} --out {folder} --class-names {three_names}",
        "has 3 class names",
    ),
    ("explain-threshold", "explain {image} --weights {bundle} --out {folder} --threshold 2", "--threshold"),
    ("explain-unknown-option", "explain {image} --nope 3", "No such option"),
    ("audit-batch-size-negative", "audit {data} --out {root}/a1 --weights {bundle} --batch-size -1", "--batch-size"),
    ("audit-limit-0", "audit {data} --out {root}/a2 --weights {bundle} --limit 0", "--limit"),
    ("audit-top-k-0", "audit {data} --out {root}/a3 --weights {bundle} --top-k 0", "--top-k"),
    ("audit-top-k-too-large", "audit {data} --out {root}/a4 --weights {bundle} --top-k 7", "the model has 4 classes"),
    ("audit-out-file", "audit {data} --out {file} --weights {bundle}", "is a file, not a folder"),
    ("audit-unknown-source", "audit {root}/absent --out {root}/a5 --weights {bundle}", "unknown source"),
    ("audit-unknown-method", "audit {data} --out {root}/a6 --weights {bundle} --method nope", "unknown method 'nope'"),
    ("audit-bad-target", "audit {data} --out {root}/a7 --weights {bundle} --target other", "--target"),
    ("report-out-folder", "report {audit} --out {folder}", "is a folder; give a file name"),
    ("report-gallery-size-negative", "report {audit} --gallery-size -3", "--gallery-size"),
    ("report-missing-audit", "report {root}/absent", "no such audit folder"),
    ("report-corrupt-manifest", "report {corrupt_manifest}", "corrupt_manifest/manifest.json is corrupt"),
    ("report-truncated-part", "report {truncated_part}", ".parquet"),
    ("query-empty-sql", "query {audit} ''", "empty SQL query"),
    ("query-bad-sql", "query {audit} 'SELEC 1'", "query failed"),
    ("query-corrupt-manifest", "query {corrupt_manifest} 'SELECT 1'", "corrupt_manifest/manifest.json is corrupt"),
    ("layers-unknown-model", "layers --model resnet99", "unknown model 'resnet99'"),
    ("layers-bad-size", "layers --weights {bundle} --size 0,3", "--size"),
    ("train-unknown-source", "train {root}/absent --out {root}/t1", "unknown source"),
    ("cpu-devices-0", "--cpu-devices 0 layers --weights {bundle}", "--cpu-devices"),
]


def _arguments(template: str, files: dict[str, Path]) -> list[str]:
    import shlex

    return shlex.split(template.format(**{k: str(v) for k, v in files.items()}))


def _assert_one_error_line(exit_code: int, stderr: str, output: str, expected: str) -> None:
    assert exit_code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and len(lines) == 1, stderr
    assert expected in error_lines[0], error_lines[0]


@pytest.mark.parametrize("template, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_user_error_is_one_line_with_exit_status_2(files, template, expected):
    result = CliRunner().invoke(app, _arguments(template, files))
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    _assert_one_error_line(result.exit_code, result.stderr, result.output, expected)


def test_outputs_are_checked_before_any_work(files):
    """A bad --json is refused before the model is even loaded (no figure written)."""
    out = files["root"] / "never_written"
    result = CliRunner().invoke(
        app, [*_arguments("explain {image} --weights {bundle} --json {folder}", files), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert not list(out.glob("*.png"))


def test_json_dash_writes_the_summary_to_standard_output(files):
    result = CliRunner().invoke(
        app, _arguments("explain {image} --weights {bundle} --out {folder} --json - --top-k 2", files)
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # standard output is the JSON and nothing else
    assert [record["file"] for record in summary["images"]] == [str(files["image"])]
    assert len(summary["images"][0]["top_k"]) == 2 and summary["errors"] == []
    assert str(files["image"]) in result.stderr  # the human-readable line went to stderr


def _subprocess(arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "from flaxcam.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *arguments], check=False, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "template, expected",
    [
        ("explain {image} --weights {mismatched} --out {folder}", "do not match the model"),
        ("query {audit} ''", "empty SQL query"),
    ],
    ids=["bundle-mismatch", "empty-query"],
)
def test_console_entry_point_prints_one_line(files, template, expected):
    completed = _subprocess(_arguments(template, files))
    _assert_one_error_line(completed.returncode, completed.stderr, completed.stdout + completed.stderr, expected)
    assert completed.stdout == ""
