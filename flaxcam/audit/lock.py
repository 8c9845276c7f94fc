"""An exclusive lock on an audit's output folder, so that two audits never write into one folder at once.

Design: one lock file per process index of the audit, ``.lock-pNNNNN`` (process ``NNNNN`` of
``jax.process_count()``), locked with ``flock`` (``LOCK_EX | LOCK_NB``) for as long as that process
audits, and holding the holder's PID, host, process index and start time as JSON.

* Two audits exclude each other through ``.lock-p00000``: every audit, single- or multi-process, has a
  process 0. In a multi-process audit (``jax.distributed``) every process also locks its own index, so
  a process left over from an earlier run (its process 0 gone) cannot keep writing the parts of that
  index while a new run writes them; all processes exchange whether they got their lock and refuse
  together (:func:`flaxcam.audit.runner.run`), so none waits for a partner that gave up.
* A stale lock needs no guessing: the kernel drops an ``flock`` when its holder dies (``kill -9``
  included; on NFSv4 when the holder's lease expires), so a lock that can be taken is by definition
  not held. The previous holder's details, if the file still has them (a clean exit empties it), are
  returned as ``taken_over`` for the record.
* Lock files are emptied, never deleted: deleting a lock file while another process waits on the same
  inode would let two processes hold "the" lock.

The folder must be on a filesystem with working ``flock`` (local disks, tmpfs, NFSv4); where locking
fails, the audit refuses to start rather than run unprotected.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Self

from flaxcam.audit.errors import AuditLockedError, AuditWriteError

__all__ = ["FolderLock", "lock_name"]


def lock_name(process: int) -> str:
    """The lock file of process ``process`` of an audit."""
    return f".lock-p{process:05d}"


class FolderLock:
    """The lock of process ``process`` on ``folder``; use as a context manager or call
    :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: str | os.PathLike, process: int = 0):
        self.folder = Path(folder)
        self.process = process
        self.path = self.folder / lock_name(process)
        self.taken_over: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> Self:
        """Take the lock or raise :class:`AuditLockedError` naming the holder's PID and host."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise AuditWriteError("lock file", self.path, error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AuditLockedError(
                    f"{self.folder} is in use by another audit ({_describe(_read_holder(self.path))}); "
                    "wait for it to finish, or write to another --out folder"
                ) from None
            raise AuditLockedError(
                f"cannot lock {self.path}: {error.strerror or error} (the audit folder must be on a "
                "filesystem with file locks)"
            ) from None
        self.taken_over = _parse(os.pread(fd, 4096, 0)) or None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_index": self.process,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        data = json.dumps(holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and unlock it (the file stays: see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_holder(path: Path, wait: float = 1.0) -> dict[str, Any]:
    """The holder's details; it writes them just after locking, so an empty file is read again for up
    to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            holder = _parse(path.read_bytes())
        except OSError:
            holder = {}
        if holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    text = f"PID {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("process_index"):
        text += f", process {holder['process_index']}"
    if holder.get("started"):
        text += f", since {holder['started']}"
    return text
