"""The torch-free ``.safetensors`` reader: against files built here by the format's specification and
against the ``safetensors`` package; malformed files refused; a torchvision ResNet state dict read
from ``.safetensors`` by ``load_torchvision_resnet``; and, on the command line, a checkpoint with 7
classes (class names from the checkpoint, or ``--class-names``, a mismatch refused) in explain and
audit."""

from __future__ import annotations

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxcam.cli import app
from flaxcam.models import load_torchvision_resnet
from flaxcam.models.safetensors_reader import is_safetensors, load_safetensors
from flaxcam.models.torch_checkpoint import CheckpointError

_CODES = {
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype(np.bool_): "BOOL",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype("u1"): "U8",
}


def _spec_file(
    arrays: dict[str, np.ndarray], metadata: dict | None = None, *, header_patch=None, tail: bytes = b""
) -> bytes:
    """A safetensors file written by the specification: u64 header length, JSON header, buffer."""
    header, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    if header_patch is not None:
        header_patch(header)
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the reference writer pads the header with spaces to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks) + tail


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "half": rng.normal(size=(5,)).astype(np.float16),
        "brain": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "count": np.array(7, np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_same(read: dict, arrays: dict) -> None:
    assert list(read) == list(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        np.testing.assert_array_equal(read[name], array, err_msg=name)


def test_reads_a_file_built_by_the_specification(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(_spec_file(_arrays(), {"format": "pt"}))
    assert is_safetensors(path)
    _assert_same(load_safetensors(path), _arrays())


def test_agrees_with_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {k: v for k, v in _arrays().items() if k not in ("brain",)}  # numpy API: no bfloat16
    written = tmp_path / "package.safetensors"
    safetensors_numpy.save_file(arrays, str(written), metadata={"format": "pt"})
    read = load_safetensors(written)
    assert set(read) == set(arrays)
    _assert_same({k: read[k] for k in arrays}, arrays)
    # and the package reads the spec-built file the same way (the builder above follows the format)
    built = tmp_path / "built.safetensors"
    built.write_bytes(_spec_file(arrays))
    theirs = safetensors_numpy.load_file(str(built))
    _assert_same({k: theirs[k] for k in arrays}, arrays)


def _set(name, field, value):
    def patch(header):
        header[name][field] = value

    return patch


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: b"\x01\x02", "truncated"),
        (lambda: struct.pack("<Q", 10**6) + b"{}", "does not fit the file"),
        (lambda: struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (lambda: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (lambda: _spec_file(_arrays(), header_patch=_set("half", "dtype", "F128")), "unknown dtype 'F128'"),
        (
            lambda: _spec_file(_arrays(), header_patch=_set("half", "shape", [-5])),
            "not a list of non-negative integers",
        ),
        (lambda: _spec_file(_arrays(), header_patch=_set("half", "shape", [6])), "bytes for shape [6]"),
        (lambda: _spec_file(_arrays(), header_patch=_set("count", "data_offsets", [0, 10**9])), "outside the"),
        (lambda: _spec_file(_arrays(), header_patch=_set("half", "data_offsets", [0, 10])), "overlaps another tensor"),
        (lambda: _spec_file(_arrays(), tail=b"\x00" * 4), "bytes after the last tensor"),
        (lambda: _spec_file(_arrays(), {"format": 3}), "__metadata__ must map strings to strings"),
        (lambda: _spec_file(_arrays(), header_patch=_set("half", "extra", 1)), "expected the fields"),
    ],
    ids=[
        "truncated",
        "header-too-long",
        "not-json",
        "not-object",
        "dtype",
        "negative-shape",
        "byte-count",
        "offsets-outside",
        "overlap",
        "trailing-bytes",
        "metadata",
        "extra-field",
    ],
)
def test_malformed_files_are_refused(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make())
    with pytest.raises(CheckpointError, match=None) as info:
        load_safetensors(path)
    assert message in str(info.value) and str(path) in str(info.value)


def resnet_state_dict(num_classes: int, blocks=(1, 1, 1, 1), seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision-style BasicBlock ResNet ``state_dict`` (names and shapes as torchvision's) with
    random values; ``blocks=(2, 2, 2, 2)`` is ResNet-18."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = (rng.normal(size=(out, inp, k, k)) * np.sqrt(2 / (inp * k * k))).astype(np.float32)

    def bn(name, n):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.1, n).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, n).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(10, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", width, inp, 3)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            bn(f"{prefix}.bn2", width)
            if block == 0 and stage > 1:
                conv(f"{prefix}.downsample.0", width, inp, 1)
                bn(f"{prefix}.downsample.1", width)
            inp = width
    state["fc.weight"] = (rng.normal(size=(num_classes, 512)) * 0.05).astype(np.float32)
    state["fc.bias"] = np.zeros(num_classes, np.float32)
    return state


def test_load_torchvision_resnet_reads_safetensors(tmp_path):
    state = resnet_state_dict(7)
    path = tmp_path / "resnet.safetensors"
    path.write_bytes(_spec_file(state))
    model, variables = load_torchvision_resnet(path)
    reference_model, reference = load_torchvision_resnet(state)
    assert model == reference_model
    for ours, theirs in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert model.apply(variables, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 7)


@pytest.fixture(scope="module")
def seven_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven")
    weights = root / "resnet7.safetensors"
    weights.write_bytes(_spec_file(resnet_state_dict(7)))
    data = root / "data"
    for label in ("p", "q"):
        (data / label).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(
            data / label / "0.png"
        )
    names = root / "names.txt"
    names.write_text("\n".join(f"kind {i}" for i in range(7)) + "\n")
    five = root / "five.txt"
    five.write_text("a\nb\nc\nd\ne\n")
    return {"weights": weights, "data": data, "names": names, "five": five, "root": root}


def test_explain_and_audit_name_the_classes_of_a_7_class_checkpoint(seven_classes):
    paths = seven_classes
    image = paths["data"] / "p" / "0.png"
    runner = CliRunner()
    common = ["--weights", str(paths["weights"]), "--out", str(paths["root"] / "fig"), "--top-k", "7", "--json", "-"]
    result = runner.invoke(app, ["explain", str(image), "--method", "cam", *common])
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)["images"][0]["top_k"]
    assert sorted(entry["name"] for entry in top) == [f"class_{i}" for i in range(7)]
    assert all(entry["name"] == f"class_{entry['class']}" for entry in top)

    result = runner.invoke(
        app, ["explain", str(image), "--method", "cam", *common, "--class-names", str(paths["names"])]
    )
    assert result.exit_code == 0, result.output
    assert all(e["name"] == f"kind {e['class']}" for e in json.loads(result.stdout)["images"][0]["top_k"])

    result = runner.invoke(app, ["explain", str(image), *common, "--class-names", str(paths["five"])])
    assert result.exit_code == 2 and "has 5 class names but the model" in result.stderr and "7 classes" in result.stderr

    out = paths["root"] / "audit"
    result = runner.invoke(
        app, ["audit", str(paths["data"]), "--out", str(out), "--weights", str(paths["weights"]), "--batch-size", "2"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["class_names"] == [f"class_{i}" for i in range(7)]
    result = runner.invoke(
        app,
        [
            "audit",
            str(paths["data"]),
            "--out",
            str(paths["root"] / "a2"),
            "--weights",
            str(paths["weights"]),
            "--class-names",
            str(paths["five"]),
        ],
    )
    assert result.exit_code == 2 and "has 5 class names" in result.stderr
