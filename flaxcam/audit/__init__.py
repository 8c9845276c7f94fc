"""Dataset audit: explain every image of a source and find classes whose attention is unusual.

* :func:`run` — stream a source through the jitted explain step, record predictions, boxes, attention
  statistics and low-resolution maps in Parquet parts (resumable, sharded over devices and hosts);
* :func:`write_report` — one self-contained HTML report of an audit directory;
* :func:`query` / :func:`connect` — DuckDB SQL over an audit (views ``audit`` and ``errors``);
* :func:`attention_stats` — the per-image statistics, on device.
"""

from flaxcam.audit.query import connect, query
from flaxcam.audit.report import write_report
from flaxcam.audit.runner import AuditResult, run, shard_indices
from flaxcam.audit.stats import attention_stats

__all__ = ["AuditResult", "attention_stats", "connect", "query", "run", "shard_indices", "write_report"]
