"""The audit's on-disk store: Parquet part files written atomically, an errors table and a manifest.

Layout of an audit directory::

    manifest.json                       what was audited (model, method, layer, source, class names, ...)
    part-p00000-000000.parquet ...      one row per image (see :data:`SCHEMA`); ``pNNNNN`` = process index
    errors-p00000-000000.parquet ...    one row per unreadable input: index, id, reason

Every file is written to a temporary name in the same folder and renamed into place (``os.replace``), so a
file either exists complete or not at all: a process killed at any moment (``kill -9``) leaves only whole
parts (and ``*.tmp`` files, removed on the next run). An image index is written to exactly one file, so
the set of finished indices is the union of the indices of all parts and error parts.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxcam._optional import require

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
else:
    pa = require("pyarrow", extra="audit")
    pq = require("pyarrow.parquet", extra="audit")

#: Version of the manifest and row schema; bumped on incompatible changes.
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"
ERRORS_GLOB = "errors-*.parquet"
_PART_NAME = re.compile(r"^(part|errors)-p(\d{5})-(\d{6})\.parquet$")

_STAT_COLUMNS = (
    "border_share",
    "corner_tl_share",
    "corner_tr_share",
    "corner_bl_share",
    "corner_br_share",
    "corner_max_share",
    "gt_share",
    "entropy",
    "peak_y",
    "peak_x",
    "com_y",
    "com_x",
)

#: One row per audited image. Boxes are in model-input pixels; ``low_res`` is the explained map at the
#: layer's resolution, float16 bytes in row-major order (shape in the manifest's ``low_res_shape``).
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("label", pa.int32()),
        ("pred", pa.int32()),
        ("prob", pa.float32()),
        ("correct", pa.bool_()),
        ("target", pa.int32()),
        ("target_prob", pa.float32()),
        ("topk_classes", pa.list_(pa.int32())),
        ("topk_probs", pa.list_(pa.float32())),
        ("box_x0", pa.int32()),
        ("box_y0", pa.int32()),
        ("box_x1", pa.int32()),
        ("box_y1", pa.int32()),
        ("gt_y0", pa.float32()),
        ("gt_x0", pa.float32()),
        ("gt_y1", pa.float32()),
        ("gt_x1", pa.float32()),
        ("box_iou", pa.float32()),
        *[(name, pa.float32()) for name in _STAT_COLUMNS],
        ("low_res", pa.binary()),
        ("process", pa.int32()),
    ]
)

ERRORS_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("reason", pa.string()), ("process", pa.int32())])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename it to ``path`` (same folder, so the rename is atomic).
    The file gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Write JSON atomically."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(value, indent=2, sort_keys=True))

    _atomic_write(Path(path), write)


def read_manifest(audit_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an audit directory; a clear error if there is none."""
    path = Path(audit_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{audit_dir}: not an audit directory (no {MANIFEST}); run `flaxcam audit` first")
    return json.loads(path.read_text())


def remove_stale_temporaries(audit_dir: Path) -> int:
    """Delete ``*.tmp`` files left by a killed run; returns how many."""
    stale = list(Path(audit_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def part_files(audit_dir: str | os.PathLike, kind: str = "part") -> list[Path]:
    """The complete part files (``kind="part"``) or error parts (``kind="errors"``), sorted by name."""
    return sorted(p for p in Path(audit_dir).glob(f"{kind}-*.parquet") if _PART_NAME.match(p.name))


def next_sequence(audit_dir: Path, process: int) -> int:
    """The next free part sequence number of ``process`` (parts of both kinds share the numbering)."""
    numbers = [
        int(match.group(3))
        for path in Path(audit_dir).glob("*.parquet")
        if (match := _PART_NAME.match(path.name)) and int(match.group(2)) == process
    ]
    return max(numbers, default=-1) + 1


def part_name(kind: str, process: int, sequence: int) -> str:
    return f"{kind}-p{process:05d}-{sequence:06d}.parquet"


def done_indices(audit_dir: str | os.PathLike) -> np.ndarray:
    """Sorted source indices already recorded (rows and errors) in ``audit_dir``."""
    chunks = [pq.read_table(path, columns=["index"])["index"].to_numpy() for path in part_files(audit_dir, "part")]
    chunks += [pq.read_table(path, columns=["index"])["index"].to_numpy() for path in part_files(audit_dir, "errors")]
    if not chunks:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(chunks).astype(np.int64))


def rows_table(rows: Mapping[str, Any]) -> pa.Table:
    """Arrow table of :data:`SCHEMA` from column arrays / lists."""
    return pa.table({field.name: pa.array(rows[field.name], type=field.type) for field in SCHEMA}, schema=SCHEMA)


def errors_table(errors: Iterable[tuple[int, str, str]], process: int) -> pa.Table:
    errors = list(errors)
    return pa.table(
        {
            "index": pa.array([int(e[0]) for e in errors], pa.int64()),
            "id": pa.array([str(e[1]) for e in errors], pa.string()),
            "reason": pa.array([str(e[2]) for e in errors], pa.string()),
            "process": pa.array([process] * len(errors), pa.int32()),
        },
        schema=ERRORS_SCHEMA,
    )


def write_part(path: Path, table: pa.Table) -> None:
    """Write one Parquet part atomically (zstd)."""
    _atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def decode_low_res(blobs: Iterable[bytes], shape: tuple[int, int]) -> np.ndarray:
    """``low_res`` column values → ``(N, h, w)`` float32 maps."""
    blobs = list(blobs)
    if not blobs:
        return np.zeros((0, *shape), np.float32)
    return np.frombuffer(b"".join(blobs), np.float16).reshape(len(blobs), *shape).astype(np.float32)


def read_rows(audit_dir: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All rows of an audit, sorted by index."""
    parts = part_files(audit_dir, "part")
    if not parts:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    wanted = None if columns is None else list(dict.fromkeys(["index", *columns]))
    table = pa.concat_tables([pq.read_table(path, columns=wanted) for path in parts]).sort_by("index")
    return table if columns is None else table.select(columns)


def read_errors(audit_dir: str | os.PathLike) -> pa.Table:
    """All error rows of an audit, sorted by index."""
    parts = part_files(audit_dir, "errors")
    if not parts:
        return ERRORS_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(path) for path in parts]).sort_by("index")
