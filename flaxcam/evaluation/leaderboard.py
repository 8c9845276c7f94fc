"""``flaxcam evaluate``: explain every image of a source with every method, score every metric, and write
a leaderboard (methods × metrics with bootstrap confidence intervals, time per image, deletion /
insertion curves, a Parquet file of per-image scores and a self-contained HTML page).

Streaming and resumable like the audit (it reuses :mod:`flaxcam.audit.store`): batches come from
:func:`flaxcam.data.iterate_batches`; after each batch one Parquet part (one row per image and method)
is written atomically, so a killed run loses at most the batch in flight and a rerun of the same
command does only what is missing. Unreadable images are recorded in ``errors-*.parquet`` and
skipped. Each batch is explained and scored by jitted programs of a fixed batch shape (the last batch
is padded), so each method and metric compiles once.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flaxcam.audit import store
from flaxcam.evaluation.registry import Batch, explainer, get_metrics

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
TARGETS = ("predicted", "label")
#: Settings that must match for a rerun to resume.
_RESUME_FIELDS = (
    "schema_version",
    "model_fingerprint",
    "methods",
    "metrics",
    "source_spec",
    "source_length",
    "preprocessing",
    "target",
    "options",
    "method_options",
    "layer",
)


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    """What :func:`evaluate` wrote: ``table`` (one row per method and score column: ``mean``, ``ci_low``,
    ``ci_high``, ``count``, ``higher_is_better``), ``timing`` (seconds per image per method for
    ``explain`` and each metric, median over batches), and the paths of the Parquet scores and HTML page."""

    out_dir: Path
    table: pa.Table
    timing: pa.Table
    scores: Path
    html: Path
    images: int
    errors: int


#: Metric settings ``evaluate(options=...)`` accepts, with their defaults.
OPTIONS = {
    "score": "softmax",
    "steps": 20,
    "baseline": "zeros",
    "percentiles": [10, 20, 30, 40, 50, 60, 70, 80, 90],
    "noise": 0.01,
    "chunk_size": 32,
    "cascade": None,
    "randomization_seed": 1,
}


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The metric settings with defaults filled in; one clear error for an unknown name or a bad value
    (checked before any image is read, so a run never fails half-way on a setting)."""
    from flaxcam.evaluation.common import check_percentiles, check_positive, check_score
    from flaxcam.evaluation.perturbation import BASELINES

    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; valid: {', '.join(f'{k} (default {v})' for k, v in OPTIONS.items())}"
        )
    merged = {**OPTIONS, **options}
    check_score(merged["score"])
    check_positive("steps", merged["steps"])
    check_positive("chunk_size", merged["chunk_size"])
    if isinstance(merged["baseline"], str) and merged["baseline"] not in BASELINES:
        raise ValueError(f"unknown baseline {merged['baseline']!r}; valid: {', '.join(BASELINES)}")
    merged["percentiles"] = list(check_percentiles(merged["percentiles"]))
    return merged


def get_methods(names: str | Sequence[str]) -> list[str]:
    """``"all"`` (every method that explains a layer of a CNN: all but the attention methods, which read a
    ViT's blocks; name them to run them) or a comma-separated list → method names; an unknown name lists
    the valid ones."""
    from flaxcam.methods import METHODS

    if isinstance(names, str):
        if names.strip() == "all":
            names = [name for name, method in METHODS.items() if not method.attention_layers]
        else:
            names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or names}; valid: all, {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(names))


def bootstrap_interval(
    values: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite values and its percentile-bootstrap confidence
    interval (Efron & Tibshirani 1993) from ``resamples`` resamples with replacement."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def _columns(metrics: list) -> dict[str, bool]:
    return {column: better for metric in metrics for column, better in metric.columns.items()}


def _manifest(
    model_fingerprint: str, methods, metrics, spec, length, preprocessing, target, options, method_options, layer
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": model_fingerprint,
        "methods": list(methods),
        "metrics": [m.name for m in metrics],
        "source_spec": spec,
        "source_length": length,
        "preprocessing": dataclasses.asdict(preprocessing)
        if dataclasses.is_dataclass(preprocessing) and not isinstance(preprocessing, type)
        else str(preprocessing),
        "target": target,
        "options": {
            k: (v if isinstance(v, (int, float, str, list, type(None))) else str(v)) for k, v in sorted(options.items())
        },
        "method_options": {k: dict(v) for k, v in sorted(method_options.items())},
        "layer": layer,
    }


def _check_resume(out_dir: Path, manifest: Mapping[str, Any], resume: bool) -> None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return
    if not resume:
        for part in [*store.part_files(out_dir, "part"), *store.part_files(out_dir, "errors")]:
            part.unlink()
        return
    existing = json.loads(path.read_text())
    different = [
        k
        for k in _RESUME_FIELDS
        if json.dumps(existing.get(k), sort_keys=True, default=str)
        != json.dumps(manifest.get(k), sort_keys=True, default=str)
    ]
    if different:
        raise ValueError(
            f"{out_dir} holds an evaluation with different settings ({', '.join(different)}); "
            "use another --out or --no-resume to start over"
        )


def evaluate(
    source: Any,
    model: Any,
    variables: Any,
    out_dir: str | Path,
    *,
    preprocessing: Any,
    methods: str | Sequence[str] = "all",
    metrics: str | Sequence[str] = "all",
    layer: str | None = None,
    target: str = "predicted",
    batch_size: int = 8,
    options: Mapping[str, Any] | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    resume: bool = True,
    limit: int | None = None,
    resamples: int = 1000,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> Leaderboard:
    """Explain every image of ``source`` with each method, score each metric, and write the leaderboard
    to ``out_dir`` (``scores-*.parquet`` parts, ``scores.parquet``, ``leaderboard.json``,
    ``leaderboard.html``, ``curves.png``). Returns the :class:`Leaderboard`.

    ``options`` are the metrics' settings (``score`` default ``"softmax"``, ``steps`` 20, ``baseline``
    ``"zeros"``, ``percentiles`` 10..90, ``chunk_size`` 32, ``cascade``); ``method_options`` maps a method
    to its ``explain(method_options=...)``; ``layer`` is the target layer of every layer-based method
    (FullGrad takes none). ``target``: explain and score each image's ``"predicted"`` class or its
    ``"label"``. Rerunning resumes (``resume=False`` starts over); ``limit`` processes at most that many
    remaining images now.
    """
    from flaxcam.audit.manifest import model_fingerprint
    from flaxcam.audit.runner import _open
    from flaxcam.data import iterate_batches
    from flaxcam.models import init_variables

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    method_names = get_methods(methods)
    chosen = get_metrics(metrics)
    options = check_options(dict(options or {}))
    method_options = {k: dict(v) for k, v in (method_options or {}).items()}
    unknown = [m for m in method_options if m not in method_names]
    if unknown:
        raise ValueError(f"method_options for methods not evaluated: {unknown}; evaluated: {', '.join(method_names)}")
    out_dir = Path(out_dir)
    opened, spec = _open(source, out_dir)
    total = len(opened)
    out_dir.mkdir(parents=True, exist_ok=True)
    store.remove_stale_temporaries(out_dir, 0)
    manifest = _manifest(
        model_fingerprint(variables),
        method_names,
        chosen,
        spec,
        total,
        preprocessing,
        target,
        options,
        method_options,
        layer,
    )
    _check_resume(out_dir, manifest, resume)
    store.write_json(out_dir / MANIFEST, manifest)
    remaining = np.setdiff1d(np.arange(total), store.done_indices(out_dir))
    if limit is not None:
        remaining = remaining[:limit]

    apply_fn = model.apply
    forward = jax.jit(apply_fn)
    explain_fns = {}
    for name in method_names:
        from flaxcam.methods import METHODS

        method_layer = None if METHODS[name].bias_layers else layer
        explain_fns[name] = explainer(model, name, layer=method_layer, method_options=method_options.get(name))
    fresh = None
    if any(m.name == "randomization" for m in chosen):
        fresh = init_variables(model, (1, *preprocessing.size, 3), seed=int(options.get("randomization_seed", 1)))
    sequence = store.next_sequence(out_dir, 0)
    done = 0
    started = time.perf_counter()
    for batch in iterate_batches(opened, preprocessing, batch_size, indices=remaining):
        if batch.errors:
            store.write_part(out_dir / store.part_name("errors", 0, sequence), store.errors_table(batch.errors, 0))
            sequence += 1
        valid = np.asarray(batch.valid)
        if not valid.any():
            continue
        images = jnp.asarray(batch.images)
        if target == "label":
            targets = np.where(batch.labels >= 0, batch.labels, 0).astype(np.int32)
        else:
            targets = np.asarray(jnp.argmax(forward(variables, images), axis=1)).astype(np.int32)
        ids = np.asarray(batch.indices).astype(np.int64)
        rows = _score_batch(apply_fn, variables, images, targets, valid, explain_fns, chosen, fresh, options, ids)
        base = {
            "index": batch.indices[valid].astype(np.int64),
            "id": [batch.ids[i] for i in np.flatnonzero(valid)],
            "label": batch.labels[valid].astype(np.int32),
            "target": targets[valid],
        }
        tables = [pa.table({**base, "method": [name] * int(valid.sum()), **columns}) for name, columns in rows.items()]
        store.write_part(
            out_dir / store.part_name("part", 0, sequence), pa.concat_tables(tables, promote_options="default")
        )
        sequence += 1
        done += int(valid.sum())
        if progress:
            rate = done / (time.perf_counter() - started)
            print(f"\r{done}/{len(remaining)} images ({rate:.2f} images/s)", end="", flush=True)
    if progress:
        print()
    return write_leaderboard(out_dir, resamples=resamples, class_names=class_names)


def _score_batch(apply_fn, variables, images, targets, valid, explain_fns, chosen, fresh, options, ids) -> dict:
    """``{method: {column: values of the valid rows}}`` with the per-image seconds of each step."""
    out = {}
    count = int(valid.sum())
    for name, explain_fn in explain_fns.items():
        tick = time.perf_counter()
        maps = jax.block_until_ready(explain_fn(variables, images, jnp.asarray(targets)))
        columns: dict[str, Any] = {"seconds_explain": np.full(count, (time.perf_counter() - tick) / count)}
        context = Batch(apply_fn, variables, images, maps, jnp.asarray(targets), explain_fn, fresh, options, ids)
        for metric in chosen:
            tick = time.perf_counter()
            values = jax.block_until_ready(metric.compute(context))
            columns[f"seconds_{metric.name}"] = np.full(count, (time.perf_counter() - tick) / count)
            for column, value in values.items():
                value = np.asarray(value, np.float64)[valid]
                columns[column] = list(value) if value.ndim == 2 else value
        out[name] = columns
    return out


def read_scores(out_dir: str | Path) -> pa.Table:
    """All per-image rows of an evaluation (one per image and method), sorted by method and index."""
    parts = store.part_files(out_dir, "part")
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no scores yet (run `flaxcam evaluate` first)")
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default").sort_by(
        [("method", "ascending"), ("index", "ascending")]
    )


def write_leaderboard(
    out_dir: str | Path, resamples: int = 1000, class_names: Sequence[str] | None = None
) -> Leaderboard:
    """Summarize the parts of ``out_dir``: ``scores.parquet``, ``leaderboard.json``, ``curves.png`` and
    the self-contained ``leaderboard.html``."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    page = out_dir / "leaderboard.html"
    if not store.part_files(out_dir, "part"):  # nothing readable scored yet (e.g. --limit over unreadable files)
        errors = store.read_errors(out_dir).num_rows
        page.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>flaxcam leaderboard</title></head>"
            f"<body><p>No image scored yet ({errors} unreadable).</p></body></html>"
        )
        empty = pa.table({})
        return Leaderboard(out_dir, empty, empty, out_dir / "scores.parquet", page, 0, errors)
    scores = read_scores(out_dir)
    pq.write_table(scores, out_dir / "scores.parquet", compression="zstd")
    errors = store.read_errors(out_dir).num_rows
    chosen = get_metrics(manifest["metrics"])
    columns = _columns(chosen)
    methods = [m for m in manifest["methods"] if m in set(scores["method"].to_pylist())]
    method_column = np.asarray(scores["method"].to_pylist())
    rows, timing = [], []
    for method in methods:
        where = method_column == method
        for column, higher in columns.items():
            values = scores[column].to_numpy(zero_copy_only=False)[where].astype(np.float64)
            mean, low, high = bootstrap_interval(values, resamples)
            rows.append(
                {
                    "method": method,
                    "column": column,
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "count": int(np.isfinite(values).sum()),
                    "higher_is_better": higher,
                }
            )
        for step in ["explain", *(m.name for m in chosen)]:
            seconds = scores[f"seconds_{step}"].to_numpy()[where]
            timing.append({"method": method, "step": step, "seconds_per_image": float(np.median(seconds))})
    table = pa.Table.from_pylist(rows)
    timing_table = pa.Table.from_pylist(timing)
    images = len(set(scores["index"].to_pylist()))
    store.write_json(
        out_dir / "leaderboard.json",
        {"images": images, "errors": errors, "rows": rows, "timing": timing, "manifest": manifest},
    )
    curves_png = (
        _curves_figure(scores, methods, out_dir / "curves.png") if "deletion_curve" in scores.column_names else None
    )
    page.write_text(_html(manifest, rows, timing, columns, methods, images, errors, curves_png))
    return Leaderboard(out_dir, table, timing_table, out_dir / "scores.parquet", page, images, errors)


def _curves_figure(scores: pa.Table, methods: list[str], path: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method_column = np.asarray(scores["method"].to_pylist())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for method in methods:
        where = np.flatnonzero(method_column == method)
        for ax, column in zip(axes, ("deletion_curve", "insertion_curve")):
            curves = np.asarray([scores[column][int(i)].as_py() for i in where], np.float64)
            ax.plot(np.linspace(0, 1, curves.shape[1]), np.nanmean(curves, axis=0), label=method)
    for ax, title in zip(axes, ("deletion (lower area is better)", "insertion (higher area is better)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of pixels perturbed")
    axes[0].set_ylabel("mean target score")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.best{font-weight:bold;background:#e6f4e6}.ci{color:#777;font-size:11px}"""


def _html(manifest, rows, timing, columns, methods, images, errors, curves_png) -> str:
    def cell(method: str, column: str) -> str:
        row = next(r for r in rows if r["method"] == method and r["column"] == column)
        return f"{row['mean']:.4f}<br><span class=ci>[{row['ci_low']:.4f}, {row['ci_high']:.4f}]</span>"

    best = {}
    for column, higher in columns.items():
        means = {r["method"]: r["mean"] for r in rows if r["column"] == column and np.isfinite(r["mean"])}
        if means:
            best[column] = (max if higher else min)(means, key=means.__getitem__)
    head = "".join(f"<th>{html.escape(c)} {'↑' if h else '↓'}</th>" for c, h in columns.items())
    body = "".join(
        f"<tr><td>{html.escape(m)}</td>"
        + "".join(f"<td class={'best' if best.get(c) == m else 'x'}>{cell(m, c)}</td>" for c in columns)
        + "</tr>"
        for m in methods
    )
    steps = list(dict.fromkeys(t["step"] for t in timing))
    timing_rows = "".join(
        f"<tr><td>{html.escape(m)}</td>"
        + "".join(
            f"<td>{1000 * next(t['seconds_per_image'] for t in timing if t['method'] == m and t['step'] == s):.1f}</td>"
            for s in steps
        )
        + "</tr>"
        for m in methods
    )
    curves = (
        ""
        if curves_png is None
        else f"<h2>Deletion and insertion curves</h2><img alt='mean deletion and insertion curves' "
        f"src='data:image/png;base64,{base64.b64encode(curves_png).decode()}'>"
    )
    settings = html.escape(
        json.dumps(
            {k: manifest[k] for k in ("source_spec", "target", "options", "method_options", "layer", "preprocessing")},
            default=str,
        )
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>flaxcam leaderboard</title>"
        f"<style>{_CSS}</style></head><body><h1>Faithfulness leaderboard</h1>"
        f"<p>{images} images, {errors} unreadable (skipped); mean per image with a 95% bootstrap interval; "
        f"best of each column highlighted (↑ higher is better, ↓ lower).</p>"
        f"<table><tr><th>method</th>{head}</tr>{body}</table>"
        f"<h2>Time per image (ms, median over batches)</h2><table><tr><th>method</th>"
        + "".join(f"<th>{html.escape(s)}</th>" for s in steps)
        + f"</tr>{timing_rows}</table>{curves}"
        f"<h2>Settings</h2><pre>{settings}</pre></body></html>"
    )
