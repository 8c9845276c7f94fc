"""Optional extras: a missing one fails with one line that names it, never with a traceback from deep inside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxcam._optional import EXTRAS, MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]


def test_require_returns_the_module():
    assert require("json.decoder", extra="audit") is sys.modules["json.decoder"]


def test_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # (an earlier test may have imported it)
    with pytest.raises(MissingExtraError) as info:
        require("pyarrow.parquet", extra="audit")
    message = str(info.value)
    assert "'pyarrow'" in message and "pip install 'flaxcam[audit]'" in message and "\n" not in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    assert info.value.name == "pyarrow"


def test_several_extras_and_distribution_names(monkeypatch):
    monkeypatch.setitem(sys.modules, "grain", None)
    monkeypatch.setitem(sys.modules, "grain.python", None)
    with pytest.raises(MissingExtraError, match=r"flaxcam\[audit\]' or pip install 'flaxcam\[train\]'"):
        require("grain.python", extra=("audit", "train"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(MissingExtraError, match="'tensorflow-datasets'"):
        require("tensorflow_datasets", extra="tfds")
    assert EXTRAS["sklearn"] == ("demo", "scikit-learn")


def test_broken_dependency_of_an_installed_package_is_not_masked(tmp_path, monkeypatch):
    package = tmp_path / "half_installed"
    package.mkdir()
    (package / "__init__.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("half_installed", extra="audit")
    assert not isinstance(info.value, MissingExtraError)
    assert info.value.name == "a_module_that_does_not_exist_anywhere"


@pytest.mark.parametrize(
    ("blocked", "command", "extra"),
    [
        ("duckdb", ["query", ".", "SELECT 1"], "audit"),
        ("pyarrow", ["audit", "folder:.", "--out", "audit_out"], "audit"),
    ],
)
def test_cli_reports_a_missing_extra_in_one_line(tmp_path, blocked, command, extra):
    script = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "from flaxcam.cli import main\n"
        f"sys.argv = ['flaxcam', *{command!r}]\n"
        "main()\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and f"pip install 'flaxcam[{extra}]'" in lines[0]
