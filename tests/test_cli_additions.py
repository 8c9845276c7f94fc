"""Command-line additions: ``--version``, ``flaxcam layers``, a plain folder or ``.npz`` path as a
source, ``--method`` checked before the model loads, and one XLA CPU device per core by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import flaxcam
from flaxcam import models
from flaxcam.cli import app, source_spec
from flaxcam.data.sources import save_npz

SIZE = (16, 20)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("additions") / "model.msgpack"
    kwargs = {"num_classes": 2, "features": [4, 8]}
    model = models.create_model("small_cnn", **kwargs)
    variables = models.init_variables(model, (1, *SIZE, 3), seed=0)
    models.save_bundle(
        path,
        model_name="small_cnn",
        model_kwargs=kwargs,
        variables=variables,
        meta={"input_size": list(SIZE), "class_names": ["p", "q"]},
    )
    return path, model, variables


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"flaxcam {flaxcam.__version__}"


def test_layers_lists_names_types_and_shapes(bundle):
    path, model, variables = bundle
    result = CliRunner().invoke(app, ["layers", "--weights", str(path)])
    assert result.exit_code == 0, result.output
    rows = [line.split(None, 2) for line in result.stdout.strip().splitlines()[1:]]
    expected = flaxcam.list_layers(model, variables, np.zeros((1, *SIZE, 3), np.float32))
    assert [(name, kind, shape) for name, kind, shape in rows] == [
        (i.name, i.module_type, str(tuple(i.shape))) for i in expected
    ]
    assert ["conv2", "Conv", "(1, 8, 10, 8)"] in rows
    result = CliRunner().invoke(app, ["layers", "--weights", str(path), "--size", "32,32", "--spatial"])
    assert result.exit_code == 0 and "fc" not in result.stdout.split() and "(1, 16, 16, 8)" in result.stdout


def test_plain_paths_are_sources(tmp_path, bundle):
    folder = tmp_path / "images"
    for label in ("p", "q"):
        (folder / label).mkdir(parents=True)
        Image.fromarray(np.full((18, 22, 3), 40 if label == "p" else 200, np.uint8)).save(folder / label / "a.png")
    npz = tmp_path / "arrays.npz"
    save_npz(npz, np.zeros((3, 8, 8, 3), np.uint8), labels=[0, 1, 0], class_names=["p", "q"])
    assert source_spec(str(folder)) == f"folder:{folder}"
    assert source_spec(str(npz)) == f"npz:{npz}"
    assert source_spec("tfds:mnist:test") == "tfds:mnist:test"  # explicit kinds pass unchanged
    with pytest.raises(ValueError, match="unknown source"):
        source_spec(str(tmp_path / "absent"))
    path = bundle[0]
    for source, count in ((folder, 2), (npz, 3)):
        out = tmp_path / f"audit_{source.name}"
        result = CliRunner().invoke(
            app, ["audit", str(source), "--out", str(out), "--weights", str(path), "--batch-size", "4"]
        )
        assert result.exit_code == 0, result.output
        assert f"{count} images, 0 unreadable, of {count} (complete)" in result.stdout


def test_method_is_checked_before_the_model_loads(tmp_path):
    """An unknown method is reported even though --weights does not exist: nothing was loaded."""
    result = CliRunner().invoke(
        app, ["explain", str(tmp_path / "x.png"), "--weights", str(tmp_path / "absent.msgpack"), "--method", "gradcan"]
    )
    assert result.exit_code == 2
    assert "unknown method 'gradcan'" in result.stderr and "gradcam" in result.stderr and "absent" not in result.stderr


def _devices_in_subprocess(*arguments: str, env_extra: dict | None = None) -> str:
    code = (
        "import sys; from flaxcam.cli import app; import jax\n"
        "@app.command('devices-for-test')\n"
        "def _devices():\n    print(jax.device_count())\n"
        "app(sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    completed = subprocess.run(
        [sys.executable, "-c", code, *arguments], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def test_cpu_is_split_into_one_device_per_core_by_default():
    from flaxcam.cli import default_cpu_devices

    assert _devices_in_subprocess("devices-for-test") == str(default_cpu_devices())
    assert _devices_in_subprocess("--cpu-devices", "3", "devices-for-test") == "3"
    assert _devices_in_subprocess("--cpu-devices", "1", "devices-for-test") == "1"
    # a device count the user already chose in XLA_FLAGS is left alone
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}
    assert _devices_in_subprocess("devices-for-test", env_extra=flags) == "5"
