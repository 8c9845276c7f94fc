"""Read PyTorch checkpoints (``torch.save`` files) without torch and without executing anything.

A ``.pth``/``.pt`` file is a pickle whose tensors point at raw storages. Unpickling it with the standard
``pickle`` module would run whatever callables the file names (``os.system``, ...). Here the pickle is
read by a restricted :class:`pickle.Unpickler` whose ``find_class`` resolves only the handful of globals
a state dict needs, each to a function of this module that builds numpy arrays; any other global is
refused with an :class:`UnsafeCheckpointError` naming it, before anything is called.

Two formats are read:

* **zip** (torch >= 1.6, the default): a zip archive ``<name>/data.pkl`` (the pickle),
  ``<name>/data/<key>`` (one raw storage per file), optionally ``<name>/byteorder``. A tensor in the
  pickle is ``torch._utils._rebuild_tensor_v2(<storage>, offset, size, stride, requires_grad, hooks)``
  whose ``<storage>`` is the persistent id ``("storage", torch.FloatStorage, key, location, numel)``.
* **legacy** (``_use_new_zipfile_serialization=False`` and torch < 1.6): five concatenated pickles and
  raw data: the magic number ``0x1950a86a20f9469cfc6c``, the protocol version 1001, a sys-info dict
  (``little_endian``, ``type_sizes``), the object itself (persistent ids
  ``("storage", type, key, location, numel, view_metadata)``), the sorted list of storage keys, then for
  each key in that order an 8-byte little-endian element count followed by the storage's bytes.

Every tensor is bounds-checked against its storage (offset, sizes and strides) before a strided view is
taken and copied, so a tampered file cannot make the reader touch memory outside the data it holds.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_torch_checkpoint", "load_torch_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class CheckpointError(ValueError):
    """A file that is not a readable PyTorch checkpoint (truncated, corrupt, unknown format)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a global outside the allowed set (nothing was executed)."""


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a dependency of jax

    return np.dtype(ml_dtypes.bfloat16)


#: torch storage class name -> numpy dtype (a callable for dtypes numpy lacks).
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}


class _Frozen:
    """Objects of this reader that a pickle's BUILD opcode must not modify (it would call ``__setstate__``)."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(
            f"malformed checkpoint: the pickle tries to set the state of a {type(self).__name__} "
            "(refused; nothing in the file was executed)"
        )


class _StorageType(_Frozen):
    """What ``torch.FloatStorage`` & co. resolve to: a name and a numpy dtype (never called)."""

    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self) -> np.dtype:
        dtype = _STORAGE_DTYPES[self.name]
        return dtype() if callable(dtype) else dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Frozen):
    """A storage referenced by a persistent id; ``data`` (a 1-D numpy array) is filled in when read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _LazyTensor(_Frozen):
    """A tensor whose storage bytes may come later in the file (legacy format)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if not isinstance(data, np.ndarray) or data.ndim != 1:
            raise CheckpointError(f"storage {self.storage.key!r} is referenced by a tensor but holds no data")
        # Validated again here, just before the strided view: nothing may point outside ``data``.
        offset, size, stride = self.offset, _as_int_tuple(self.size, "size"), _as_int_tuple(self.stride, "stride")
        if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
            raise CheckpointError(f"malformed tensor: offset {offset!r}, size {size}, stride {stride}")
        numel = int(np.prod(size, dtype=object))
        if numel == 0:
            return np.zeros(size, data.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.shape[0]:
            raise CheckpointError(
                f"malformed tensor: size {size}, stride {stride} at offset {offset} reaches element {last} of "
                f"storage {self.storage.key!r}, which holds {data.shape[0]} elements"
            )
        if numel > 16 * data.shape[0] + 2**20:  # only stride-0 (expanded) tensors can get here
            raise CheckpointError(
                f"refusing to expand a tensor of size {size} (stride {stride}) from a storage of "
                f"{data.shape[0]} elements"
            )
        strides = tuple(s * data.itemsize for s in stride)
        view = np.lib.stride_tricks.as_strided(data[offset:], size, strides, writeable=False)
        return np.array(view, copy=True)


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"malformed tensor: {what} must be a tuple of ints, got {value!r}")
    if any(v < 0 for v in value):
        raise CheckpointError(f"malformed tensor: negative {what} {value!r}")
    return value


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v2`` (extra arguments: requires_grad, hooks...)."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"malformed tensor: storage is {type(storage).__name__}, not a storage reference")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise CheckpointError(f"malformed tensor: storage offset {storage_offset!r}")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"malformed tensor: size {size} and stride {stride} differ in length")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _LazyTensor:
    """Safe stand-in for the older ``torch._utils._rebuild_tensor``."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """Safe stand-in for ``torch._utils._rebuild_parameter(data, requires_grad, hooks[, state])``."""
    if not isinstance(data, _LazyTensor):
        raise CheckpointError(f"malformed parameter: data is {type(data).__name__}, not a tensor")
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    """``collections.OrderedDict`` without arguments (the only way a torch pickle calls it)."""
    if args:
        raise CheckpointError("malformed checkpoint: OrderedDict called with arguments")
    return OrderedDict()


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; persistent ids become :class:`_Storage` references."""

    def __init__(self, file: Any, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}' from the checkpoint: only PyTorch tensors, storages "
                "and OrderedDict are allowed (nothing in the file was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CheckpointError(f"malformed checkpoint: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"malformed checkpoint: storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"malformed checkpoint: storage reference {pid!r}")
        if self._legacy and len(pid) > 5 and pid[5] is not None:
            raise CheckpointError("unsupported legacy checkpoint: storage views (torch < 0.4) are not supported")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype:
            raise CheckpointError(f"malformed checkpoint: storage {key!r} used with two dtypes")
        return storage


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Replace every :class:`_LazyTensor` in nested dicts, lists and tuples by a numpy array."""
    if depth > 100:
        raise CheckpointError("malformed checkpoint: nesting deeper than 100 levels")
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _materialize(v, depth + 1)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, depth + 1) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise CheckpointError("unsupported checkpoint: it holds a bare storage, not a tensor")
    return obj


def _unpickle(file: Any, storages: dict[str, _Storage], legacy: bool, what: str, path: Path) -> Any:
    try:
        return _RestrictedUnpickler(file, storages, legacy).load()
    except CheckpointError:
        raise
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        struct.error,
        MemoryError,
        RecursionError,
    ) as err:
        message = "truncated" if isinstance(err, EOFError) else "corrupt"
        raise CheckpointError(f"{path}: {message} PyTorch checkpoint (while reading {what}): {err!r}") from err


def _read_legacy(path: Path, raw: bytes) -> Any:
    stream = io.BytesIO(raw)
    magic = _unpickle(stream, {}, True, "the magic number", path)
    if magic != LEGACY_MAGIC:
        shown = repr(magic) if isinstance(magic, int) else f"a {type(magic).__name__}"
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint: a pickle that starts with {shown}, not the magic number of "
            "torch.save's legacy format"
        )
    version = _unpickle(stream, {}, True, "the protocol version", path)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{path}: unsupported legacy checkpoint protocol version {version!r}")
    sys_info = _unpickle(stream, {}, True, "the system info", path)
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    obj = _unpickle(stream, storages, True, "the pickled object", path)
    keys = _unpickle(stream, {}, True, "the storage keys", path)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: corrupt PyTorch checkpoint: storage key list is {type(keys).__name__}")
    count_format = "<q" if little_endian else ">q"
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise CheckpointError(f"{path}: corrupt PyTorch checkpoint: data for unreferenced storage {key!r}")
        head = stream.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated PyTorch checkpoint: storage {key!r} is missing")
        (count,) = struct.unpack(count_format, head)
        if count < 0:
            raise CheckpointError(f"{path}: corrupt PyTorch checkpoint: storage {key!r} has {count} elements")
        nbytes = count * storage.dtype.itemsize
        data = stream.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(
                f"{path}: truncated PyTorch checkpoint: storage {key!r} needs {nbytes} bytes, the file holds "
                f"{len(data)}"
            )
        dtype = storage.dtype if little_endian else storage.dtype.newbyteorder(">")
        storage.data = np.frombuffer(data, dtype).astype(storage.dtype, copy=False)
    return obj


def _read_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (bad zip archive): {err}") from err
    with archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: a zip file but not a PyTorch checkpoint (expected one '<name>/data.pkl', found "
                f"{pickles or 'none'})"
            )
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if f"{prefix}byteorder" in names:
            little_endian = archive.read(f"{prefix}byteorder").strip() != b"big"
        try:
            pickled = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint: {err}") from err
        storages: dict[str, _Storage] = {}
        obj = _unpickle(io.BytesIO(pickled), storages, False, "data.pkl", path)
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise CheckpointError(
                    f"{path}: truncated PyTorch checkpoint: storage file {member!r} is missing"
                ) from None
            nbytes = storage.numel * storage.dtype.itemsize
            if info.file_size != nbytes:
                raise CheckpointError(
                    f"{path}: corrupt PyTorch checkpoint: {member!r} holds {info.file_size} bytes, expected "
                    f"{nbytes} ({storage.numel} x {storage.dtype})"
                )
            try:
                data = archive.read(member)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({member}): {err}") from err
            dtype = storage.dtype if little_endian else storage.dtype.newbyteorder(">")
            storage.data = np.frombuffer(data, dtype).astype(storage.dtype, copy=False)
    return obj


def load_torch_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read any ``torch.save`` file (zip or legacy format) safely; tensors become numpy arrays.

    Returns the saved object with its nested dicts, lists and tuples; only plain Python values,
    ``OrderedDict`` and tensors are allowed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle names a global that is not allowed (e.g. ``os.system``).
        CheckpointError: truncated, corrupt, or not a PyTorch checkpoint (a ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        obj = _read_zip(path)
    elif head[:1] == b"\x80":  # a pickle of protocol >= 2: the legacy format's magic number
        obj = _read_legacy(path, path.read_bytes())
    elif not head:
        raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
    else:
        hint = " (a tar archive: torch < 0.4 checkpoints are not supported)" if _is_tar(path) else ""
        raise CheckpointError(
            f"{path}: unknown format, not a PyTorch checkpoint{hint}: expected a zip archive (torch >= 1.6) "
            f"or the legacy pickle format, the file starts with {head!r}"
        )
    return _materialize(obj)


def _is_tar(path: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` file without torch: ``{key: numpy array}`` in the file's order.

    A ``.safetensors`` file (recognized by its header, whatever its name) is read by
    :func:`flaxcam.models.safetensors_reader.load_safetensors`, with the same checks. A checkpoint dict wrapping the state dict under ``"state_dict"`` or ``"model"`` (training
    checkpoints) is unwrapped. Nothing from the file is executed (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle names a refused global, e.g. ``os.system`` (a ``ValueError``).
        CheckpointError: truncated, corrupt, unknown format, or not a state dict (a ``ValueError``).
    """
    from flaxcam.models.safetensors_reader import is_safetensors, load_safetensors

    if Path(path).suffix == ".safetensors" or is_safetensors(path):
        state_dict = load_safetensors(path)
        if not state_dict:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors")
        return state_dict
    obj = load_torch_checkpoint(path)
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        raise CheckpointError(
            f"{path}: the checkpoint holds a {kind}, not a state_dict (a mapping of names to tensors)"
        )
    return dict(obj)
