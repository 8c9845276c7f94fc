"""SQL over an audit directory with DuckDB: views ``audit`` (one row per image) and ``errors``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flaxcam.audit import store


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(audit_dir: str | os.PathLike, *, allow_files: bool = False) -> Any:
    """An in-memory DuckDB connection with the views ``audit`` and ``errors`` over the audit's Parquet
    parts (empty views with the right columns when there are no parts yet) and ``manifest`` (class names).

    Unless ``allow_files``, the connection can read the audit's parts and nothing else: DuckDB's
    ``enable_external_access`` is off (no other file read or written, no ``ATTACH``, no extension
    installed or loaded) and the configuration is locked, so SQL cannot turn it back on."""
    import duckdb

    audit_dir = Path(audit_dir)
    manifest = store.read_manifest(audit_dir)
    connection = duckdb.connect()
    parts = {kind: store.part_files(audit_dir, kind) for kind in ("part", "errors")}
    if not allow_files:
        allowed = ", ".join(_sql_string(str(path)) for path in [*parts["part"], *parts["errors"]])
        connection.execute(f"SET allowed_paths = [{allowed}]")
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
    for view, kind, schema in (("audit", "part", store.SCHEMA), ("errors", "errors", store.ERRORS_SCHEMA)):
        files = parts[kind]
        if files:
            paths = ", ".join(_sql_string(str(path)) for path in files)
            connection.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{paths}])")
        else:
            empty = schema.empty_table()
            connection.register(f"_{view}_empty", empty)
            connection.execute(f"CREATE VIEW {view} AS SELECT * FROM _{view}_empty")
    names = manifest.get("class_names") or []
    connection.execute("CREATE TABLE classes (class INTEGER, name VARCHAR)")
    if names:
        connection.executemany("INSERT INTO classes VALUES (?, ?)", list(enumerate(names)))
    return connection


def query(audit_dir: str | os.PathLike, sql: str, *, allow_files: bool = False) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the audit; returns ``(column names, rows)``. ``allow_files``: let the SQL read
    and write other files (see :func:`connect`; off by default).

    Example: ``query(dir, "SELECT label, avg(corner_max_share) FROM audit GROUP BY label ORDER BY 2 DESC")``.
    """
    connection = connect(audit_dir, allow_files=allow_files)
    try:
        result = connection.execute(sql)
        columns = [description[0] for description in result.description or []]
        return columns, result.fetchall()
    finally:
        connection.close()


def format_table(columns: list[str], rows: list[tuple], max_width: int = 40) -> str:
    """Plain-text table (tab separated header + rows); long values are shortened."""

    def cell(value: Any) -> str:
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        if isinstance(value, float):
            return f"{value:.6g}"
        text = str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    lines = ["\t".join(columns)]
    lines += ["\t".join(cell(value) for value in row) for row in rows]
    return "\n".join(lines)
