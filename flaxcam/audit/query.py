"""SQL over an audit directory with DuckDB: views ``audit`` (one row per image) and ``errors``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flaxcam._optional import require
from flaxcam.audit import store


def connect(audit_dir: str | os.PathLike) -> Any:
    """An in-memory DuckDB connection with the views ``audit`` and ``errors`` over the audit's Parquet
    parts (empty views with the right columns when there are no parts yet) and ``manifest`` (class names)."""
    duckdb = require("duckdb", extra="audit")

    audit_dir = Path(audit_dir)
    manifest = store.read_manifest(audit_dir)
    connection = duckdb.connect()
    for view, kind, schema in (("audit", "part", store.SCHEMA), ("errors", "errors", store.ERRORS_SCHEMA)):
        files = store.part_files(audit_dir, kind)
        if files:
            paths = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
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


def query(audit_dir: str | os.PathLike, sql: str) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the audit; returns ``(column names, rows)``.

    Example: ``query(dir, "SELECT label, avg(corner_max_share) FROM audit GROUP BY label ORDER BY 2 DESC")``.
    """
    connection = connect(audit_dir)
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
