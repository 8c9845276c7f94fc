"""Why an audit stopped: one exception type per cause, each with a one-line message saying what to do.

Every type derives from :class:`AuditError`, so a caller (the command line) can report all of them the
same way; each also derives from the matching built-in type (``OSError``, ``ValueError``,
``RuntimeError``) for callers that already handle those.
"""

from __future__ import annotations

import os
from pathlib import Path


class AuditError(Exception):
    """An audit cannot go on; ``str(error)`` is a complete, one-line explanation."""


class AuditWriteError(AuditError, OSError):
    """A part, an errors part or the manifest could not be written (full disk, quota, removed folder).

    Everything written before is intact (each file is written atomically), so rerunning the same
    command after fixing the cause resumes the audit."""

    def __init__(self, what: str, path: Path, cause: OSError):
        code = cause.errno
        if code is None and len(cause.args) == 1 and isinstance(cause.args[0], int):
            code = cause.args[0]  # OSError(28)
        reason = cause.strerror or (os.strerror(code) if code else str(cause) or type(cause).__name__)
        super().__init__(f"cannot write {what} {path}: {reason}")
        self.errno = code  # (not ``filename``: OSError would then reformat the message)
        self.path = Path(path)


class AuditLockedError(AuditError, RuntimeError):
    """Another audit (a live process) is writing to the same output folder."""


class AuditSettingsError(AuditError, ValueError):
    """The output folder holds parts or a manifest of an audit with other settings (or unreadable ones)."""
