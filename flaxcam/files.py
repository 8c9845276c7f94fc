"""Writing files atomically, with the usual permissions: the one mechanism behind every file flaxcam
writes that must never be seen half-written (model bundles, audit parts, manifests, reports).

:func:`atomic_write` writes to a temporary file in the destination folder, flushes it to disk, renames
it over the destination (``os.replace``, atomic within one filesystem) and flushes the folder entry. A
reader sees the old file or the new one, never a mix; a process killed at any moment leaves at most a
temporary file (``.NAME.RANDOM.tmp``, see :func:`temporary_pattern`), which the next writer may remove.

The temporary file is created with mode ``0o666`` less the process umask, like ``open(path, "w")``,
so what flaxcam writes gets the same permissions as any other file the user creates
(``tempfile.mkstemp`` would give a private ``0o600``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "temporary_pattern"]


def temporary_pattern(name: str) -> str:
    """Glob pattern matching the temporary files :func:`atomic_write` uses for a destination ``name``."""
    return f".{name}.*.tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a new temporary file next to ``path``, then rename it to ``path``.

    The file ends up with mode ``0o666 & ~umask``. On any error (a full disk, a removed folder, an
    exception in ``write``) the temporary file is removed, ``path`` is left as it was, and the error is
    raised unchanged. Returns ``path``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of ``text``."""
    return atomic_write_bytes(path, text.encode(encoding))


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: some filesystems cannot open or sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
