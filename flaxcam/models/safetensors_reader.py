"""Read ``.safetensors`` files (the format timm and torchvision publish weights in) without the
``safetensors`` package and without torch.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian unsigned header length
``N``, ``N`` bytes of UTF-8 JSON ``{"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin,
end]}, ..., "__metadata__": {str: str}}``, then the byte buffer; ``begin`` and ``end`` count bytes from
the buffer's start, tensors are row-major little-endian. Nothing in the file is executed; every entry
is checked before any array is built: a known dtype, non-negative integer shape, offsets inside the
buffer whose length is exactly ``prod(shape) * itemsize``, and entries that tile the buffer without
overlaps or holes (as the format requires). A header larger than :data:`MAX_HEADER_BYTES` is refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from flaxcam.models.torch_checkpoint import CheckpointError

__all__ = ["MAX_HEADER_BYTES", "is_safetensors", "load_safetensors"]

#: The largest JSON header read (the reference implementation's limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # a dependency of jax

    return {
        "F64": np.dtype("<f8"),
        "F32": np.dtype("<f4"),
        "F16": np.dtype("<f2"),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype("<i8"),
        "I32": np.dtype("<i4"),
        "I16": np.dtype("<i2"),
        "I8": np.dtype("i1"),
        "U64": np.dtype("<u8"),
        "U32": np.dtype("<u4"),
        "U16": np.dtype("<u2"),
        "U8": np.dtype("u1"),
        "BOOL": np.dtype(np.bool_),
        "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    }


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts like a safetensors file: a plausible header length, then ``{``."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length <= min(MAX_HEADER_BYTES, size - 8)


def _header(path: Path, raw: bytes) -> tuple[dict[str, Any], int]:
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({len(raw)} bytes, no header length)")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(raw):
        raise CheckpointError(f"{path}: safetensors header of {length} bytes does not fit the file of {len(raw)} bytes")
    try:
        header = json.loads(raw[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a {type(header).__name__}, not a JSON object")
    return header, 8 + length


def _entry(
    path: Path, name: str, info: Any, dtypes: dict[str, np.dtype], buffer_size: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: tensor {name!r}: expected the fields dtype, shape, data_offsets, got {info!r}")
    dtype = dtypes.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {info['dtype']!r}; known: {', '.join(dtypes)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_size:
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} outside the {buffer_size}-byte buffer")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} of {info['dtype']} "
            f"({math.prod(shape) * dtype.itemsize} expected)"
        )
    return dtype, tuple(shape), begin, end


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file: ``{name: numpy array}`` in the header's order (``__metadata__``
    left out). Every entry is validated first (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: a truncated or malformed file (a ``ValueError``), naming the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    raw = path.read_bytes()
    header, start = _header(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    buffer = memoryview(raw)[start:]
    dtypes = _dtypes()
    entries = {name: _entry(path, name, info, dtypes, len(buffer)) for name, info in header.items()}
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != covered:
            kind = (
                "overlaps another tensor" if begin < covered else f"leaves a hole of {begin - covered} bytes before it"
            )
            raise CheckpointError(f"{path}: tensor {name!r} (bytes {begin}..{end}) {kind}")
        covered = end
    if covered != len(buffer):
        raise CheckpointError(
            f"{path}: {len(buffer) - covered} bytes after the last tensor (the buffer must be fully indexed)"
        )
    return {
        name: np.frombuffer(buffer[begin:end], dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
        for name, (dtype, shape, begin, end) in entries.items()
    }
