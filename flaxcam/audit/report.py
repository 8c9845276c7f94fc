"""``flaxcam report``: one self-contained HTML file that summarizes an audit and points at shortcuts.

Everything is inline (images as base64 PNG, CSS and a few lines of JavaScript), nothing is fetched. The
page holds: a summary; classes ranked by how unusual their attention is; per-class accuracy, mean map and
attention statistics; the confusion matrix; galleries of the most suspicious images with jet overlays
(the images are re-read from the source recorded in the manifest); the errors table.

**Unusualness.** An image's class is its label (its prediction when unlabelled). For each statistic ``s``
(border share, the four corner shares, and the share *outside* the ground truth, ``1 - gt_share``, when
boxes or masks were given) and class ``c``, the report computes a standardized mean difference against the
rest of the dataset, ``z_c(s) = (mean_c(s) - mean_rest(s)) / sd_rest(s)`` (Glass's delta: the rest's
spread, so one unusual class does not hide itself by inflating the pooled deviation). A class's score is its
largest ``z`` — attention *more* concentrated in a corner, the border or off the object than elsewhere —
and classes are ranked by it.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from flaxcam._optional import require
from flaxcam.audit import store
from flaxcam.audit.query import connect
from flaxcam.audit.stats import CORNERS
from flaxcam.files import atomic_write_text

#: Statistics the ranking compares; ``off_gt_share`` is ``1 - gt_share`` (only with ground truth).
RANKED_STATS = ("border_share", *(f"corner_{c}_share" for c in CORNERS), "off_gt_share")
_STAT_LABELS = {
    "border_share": "border",
    "corner_tl_share": "top-left corner",
    "corner_tr_share": "top-right corner",
    "corner_bl_share": "bottom-left corner",
    "corner_br_share": "bottom-right corner",
    "off_gt_share": "off the object",
}
_CLASS_EXPR = "CASE WHEN label >= 0 THEN label ELSE pred END"


def _stat_expr(name: str) -> str:
    return "(1 - gt_share)" if name == "off_gt_share" else name


def class_statistics(connection: Any) -> dict[str, Any]:
    """Per-class counts, accuracy, means of the ranked statistics and their z-scores against the rest.

    Returns a dict of arrays indexed by position in ``classes`` (the class ids present), plus ``score``
    (the largest z of each class) and ``driver`` (the statistic giving it)."""
    parts = []
    for name in RANKED_STATS:
        expr = _stat_expr(name)
        valid = f"NOT isnan({expr})"
        parts.append(
            f"count(*) FILTER (WHERE {valid}) AS n_{name}, "
            f"coalesce(sum({expr}) FILTER (WHERE {valid}), 0) AS s_{name}, "
            f"coalesce(sum({expr} * {expr}) FILTER (WHERE {valid}), 0) AS q_{name}"
        )
    sql = (
        f"SELECT {_CLASS_EXPR} AS class, count(*) AS n, avg(CAST(correct AS DOUBLE)) AS accuracy, "
        f"count(correct) AS labelled, {', '.join(parts)} FROM audit GROUP BY 1 ORDER BY 1"
    )
    result = connection.execute(sql)
    columns = [d[0] for d in result.description]
    rows = result.fetchall()
    table = {name: np.array([row[i] for row in rows], dtype=object) for i, name in enumerate(columns)}
    out: dict[str, Any] = {
        "classes": table["class"].astype(np.int64) if rows else np.zeros(0, np.int64),
        "n": table["n"].astype(np.int64) if rows else np.zeros(0, np.int64),
        "accuracy": np.array([np.nan if a is None else a for a in table.get("accuracy", [])], np.float64),
    }
    z_all = []
    for name in RANKED_STATS:
        n = table[f"n_{name}"].astype(np.float64) if rows else np.zeros(0)
        s = table[f"s_{name}"].astype(np.float64) if rows else np.zeros(0)
        q = table[f"q_{name}"].astype(np.float64) if rows else np.zeros(0)
        mean = np.divide(s, n, out=np.full_like(s, np.nan), where=n > 0)
        rest_n = n.sum() - n
        rest_mean = np.divide(s.sum() - s, rest_n, out=np.full_like(s, np.nan), where=rest_n > 0)
        rest_var = np.divide(q.sum() - q, rest_n, out=np.full_like(s, np.nan), where=rest_n > 0) - rest_mean**2
        rest_sd = np.sqrt(np.maximum(rest_var, 0.0))
        z = np.divide(mean - rest_mean, rest_sd, out=np.full_like(s, np.nan), where=rest_sd > 1e-12)
        out[f"mean_{name}"] = mean
        out[f"z_{name}"] = z
        z_all.append(z)
    z_matrix = np.stack(z_all, axis=1) if z_all else np.zeros((0, 0))
    filled = np.where(np.isnan(z_matrix), -np.inf, z_matrix)
    best = np.argmax(filled, axis=1) if len(filled) else np.zeros(0, np.int64)
    out["score"] = np.array([filled[i, j] if np.isfinite(filled[i, j]) else np.nan for i, j in enumerate(best)])
    out["driver"] = [RANKED_STATS[j] for j in best]
    return out


def rank_classes(statistics: dict[str, Any]) -> list[int]:
    """Positions in ``statistics["classes"]`` ordered from the most to the least unusual (NaN last)."""
    score = np.where(np.isnan(statistics["score"]), -np.inf, statistics["score"])
    return [int(i) for i in np.argsort(-score, kind="stable")]


#: Longest side of the pictures embedded in the report (larger ones are scaled down to keep it small).
MAX_PICTURE_SIDE = 192


def _png(array: np.ndarray) -> str:
    from PIL import Image

    picture = Image.fromarray(array)
    if max(picture.size) > MAX_PICTURE_SIDE:
        scale = MAX_PICTURE_SIDE / max(picture.size)
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.BILINEAR
        )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _resize_map(low_res: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (half-pixel centres) resize + min-max, as the explain step does."""
    import jax.numpy as jnp

    from flaxcam import ops

    return np.asarray(ops.minmax_normalize(ops.resize_maps(jnp.asarray(low_res, jnp.float32), size)))


def _jet(maps: np.ndarray) -> np.ndarray:
    from flaxcam.colormap import jet_lut

    index = np.clip(np.round(np.nan_to_num(maps) * 255), 0, 255).astype(np.int64)
    return (jet_lut()[index] * 255).astype(np.uint8)


def _overlays(images01: np.ndarray, maps: np.ndarray, boxes: np.ndarray, alpha: float = 0.5) -> list[np.ndarray]:
    """Jet overlays (``flaxcam.colormap.overlay``) with the 20%-rule box drawn in white."""
    import jax.numpy as jnp

    from flaxcam import colormap

    blended = np.asarray(colormap.overlay(jnp.asarray(images01), jnp.asarray(maps), alpha=alpha))
    out = []
    for image, box in zip(blended, boxes):
        pixels = (image * 255).astype(np.uint8)
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 > x0 and y1 > y0:
            pixels[y0, x0:x1] = pixels[y1 - 1, x0:x1] = 255
            pixels[y0:y1, x0] = pixels[y0:y1, x1 - 1] = 255
        out.append(pixels)
    return out


class _Images:
    """Re-reads images from the audited source (the manifest's spec, or a source passed in)."""

    def __init__(self, manifest: dict[str, Any], source: Any | None, audit_dir: Path):
        self.note = ""
        self.source = source
        if source is None and manifest.get("source_spec"):
            try:
                from flaxcam.data import open_source

                self.source = open_source(manifest["source_spec"], exclude=[audit_dir])  # as the audit read it
            except Exception as error:  # the report is still useful without the images
                self.note = f"images not shown: cannot open source {manifest['source_spec']!r} ({error})"
        elif source is None:
            self.note = "images not shown: the audit recorded no source spec (audited an in-memory source)"
        if self.source is not None and len(self.source) != manifest.get("source_length"):
            self.note = f"images not shown: the source now has {len(self.source)} images, the audit had {manifest.get('source_length')}"
            self.source = None
        size = manifest["preprocessing"]["size"]
        self.size = (int(size[0]), int(size[1]))

    def get(self, index: int) -> np.ndarray | None:
        if self.source is None:
            return None
        from flaxcam.imageio import Preprocessing

        record = self.source[int(index)]
        if record.image is None:
            return None
        return Preprocessing(self.size).resize(np.asarray(record.image))


def _gallery_items(rows: list[dict[str, Any]], manifest: dict[str, Any], images: _Images, stat: str) -> list[str]:
    if not rows:
        return []
    shape = tuple(manifest["low_res_shape"])
    size = images.size
    maps = _resize_map(store.decode_low_res([r["low_res"] for r in rows], shape), size)
    boxes = np.array([[r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]] for r in rows])
    loaded = [images.get(r["index"]) for r in rows]
    names = manifest.get("class_names") or []
    items = []
    for i, row in enumerate(rows):
        image = loaded[i]
        picture = _overlays(image[None], maps[i][None], boxes[i][None])[0] if image is not None else _jet(maps[i])
        label = row["label"]
        label_text = names[label] if 0 <= label < len(names) else ("?" if label < 0 else str(label))
        pred_text = names[row["pred"]] if 0 <= row["pred"] < len(names) else str(row["pred"])
        value = row.get(stat)
        caption = (
            f"#{row['index']} {html.escape(str(row['id']))}<br>label {html.escape(label_text)} · pred "
            f"{html.escape(pred_text)} ({row['prob']:.2f})<br>{_STAT_LABELS.get(stat, stat)}: "
            f"{'n/a' if value is None else f'{value:.2f}'}"
        )
        items.append(
            f'<figure><img src="{_png(picture)}" alt="overlay of image {row["index"]}"><figcaption>{caption}</figcaption></figure>'
        )
    return items


def _suspicious_rows(connection: Any, stat: str, limit: int, class_id: int | None = None) -> list[dict[str, Any]]:
    expr = _stat_expr(stat)
    where = f"WHERE NOT isnan({expr})"
    if class_id is not None:
        where += f" AND {_CLASS_EXPR} = {int(class_id)}"
    result = connection.execute(
        f'SELECT "index", id, label, pred, prob, low_res, box_x0, box_y0, box_x1, box_y1, {expr} AS "{stat}" '
        f'FROM audit {where} ORDER BY {expr} DESC, "index" LIMIT {int(limit)}'
    )
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row)) for row in result.fetchall()]


def _class_mean_maps(audit_dir: Path, shape: tuple[int, int], classes: np.ndarray) -> dict[int, np.ndarray]:
    """Mean low-resolution map of each class, accumulated part by part (bounded memory)."""
    pq = require("pyarrow.parquet", extra="audit")

    sums = {int(c): np.zeros(shape, np.float64) for c in classes}
    counts = {int(c): 0 for c in classes}
    for path in store.part_files(audit_dir, "part"):
        table = pq.read_table(path, columns=["label", "pred", "low_res"])
        labels = table["label"].to_numpy()
        cls = np.where(labels >= 0, labels, table["pred"].to_numpy())
        maps = store.decode_low_res(table["low_res"].to_pylist(), shape)
        for c in np.unique(cls):
            sums.setdefault(int(c), np.zeros(shape))
            sums[int(c)] += maps[cls == c].sum(axis=0)
            counts[int(c)] = counts.get(int(c), 0) + int((cls == c).sum())
    return {c: sums[c] / counts[c] for c in sums if counts.get(c)}


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f3f3f3;cursor:pointer}td.name,th.name{text-align:left}
.flag{background:#ffe3e3}.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:150px;font-size:.72em}figure img{width:150px;height:auto;image-rendering:pixelated;display:block}
.meta td{text-align:left}.note{color:#a33}.thumb{width:48px;image-rendering:pixelated;vertical-align:middle}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function (header, column) {
  header.addEventListener('click', function () {
    var body = header.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = header.dataset.order !== 'asc';
    header.dataset.order = ascending ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value || a.cells[column].textContent;
      var y = b.cells[column].dataset.value || b.cells[column].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def write_report(
    audit_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    source: Any | None = None,
    top_classes: int = 3,
    gallery_size: int = 12,
    z_flag: float = 2.0,
) -> Path:
    """Write the HTML report of ``audit_dir`` to ``out`` (default ``AUDIT_DIR/report.html``).

    Args:
      source: the audited ``ImageSource`` for the overlays (default: reopened from the manifest's spec).
      top_classes: galleries are shown for this many of the most unusual classes.
      gallery_size: images per gallery.
      z_flag: classes whose score is at least this are highlighted.
    """
    audit_dir = Path(audit_dir)
    out = Path(out) if out is not None else audit_dir / "report.html"
    manifest = store.read_manifest(audit_dir)
    names = list(manifest.get("class_names") or [])
    connection = connect(audit_dir)
    try:
        stats = class_statistics(connection)
        order = rank_classes(stats)
        total_rows, accuracy = connection.execute("SELECT count(*), avg(CAST(correct AS DOUBLE)) FROM audit").fetchone()
        errors = connection.execute('SELECT "index", id, reason FROM errors ORDER BY "index" LIMIT 200').fetchall()
        error_count = connection.execute("SELECT count(*) FROM errors").fetchone()[0]
        confusion = connection.execute(
            "SELECT label, pred, count(*) FROM audit WHERE label >= 0 GROUP BY 1, 2"
        ).fetchall()
        images = _Images(manifest, source, audit_dir)
        shape = tuple(manifest.get("low_res_shape") or (0, 0))
        mean_maps = _class_mean_maps(audit_dir, shape, stats["classes"]) if total_rows else {}
        has_gt = bool(np.any(np.isfinite(stats.get("mean_off_gt_share", np.zeros(0)))))
        ranked = [s for s in RANKED_STATS if s != "off_gt_share" or has_gt]

        def class_name(c: int) -> str:
            return names[c] if 0 <= c < len(names) else str(c)

        def thumb(c: int) -> str:
            if c not in mean_maps:
                return ""
            picture = _jet(_resize_map(mean_maps[c][None], images.size)[0])
            return f'<img class="thumb" src="{_png(picture)}" alt="mean map of class {html.escape(class_name(c))}">'

        sections = []
        status = manifest.get("status", "?")
        counts = manifest.get("counts", {})
        meta_rows = [
            (
                "model",
                " · ".join(
                    [str(manifest.get("model"))]
                    + [f"{k}: {v}" for k, v in (manifest.get("model_info") or {}).items() if v]
                ),
            ),
            ("method · layer", f"{manifest.get('method')} · {manifest.get('layer')} (map {tuple(shape)})"),
            (
                "source",
                f"{manifest.get('source_spec') or manifest.get('source_type')} ({manifest.get('source_length')} images)",
            ),
            (
                "images audited",
                f"{total_rows} (+ {error_count} unreadable) of {counts.get('total', manifest.get('source_length'))} · status {status}",
            ),
            ("accuracy", _fmt(accuracy) if accuracy is not None else "no labels"),
            ("explained class", manifest.get("target")),
            ("regions", f"border band {manifest.get('border')} · corner {manifest.get('corner')} of the image side"),
        ]
        sections.append(
            "<h2>Summary</h2><table class='meta'>"
            + "".join(
                f"<tr><th class='name'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta_rows
            )
            + "</table>"
        )
        if images.note:
            sections.append(f"<p class='note'>{html.escape(images.note)}</p>")

        # Ranking
        header = "".join(f"<th>z {html.escape(_STAT_LABELS[s])}</th>" for s in ranked)
        header += "".join(f"<th>mean {html.escape(_STAT_LABELS[s])}</th>" for s in ranked)
        body = []
        for rank, i in enumerate(order, start=1):
            c = int(stats["classes"][i])
            flag = " class='flag'" if np.isfinite(stats["score"][i]) and stats["score"][i] >= z_flag else ""
            cells = "".join(f"<td>{_fmt(stats[f'z_{s}'][i], 2)}</td>" for s in ranked)
            cells += "".join(f"<td>{_fmt(stats[f'mean_{s}'][i])}</td>" for s in ranked)
            body.append(
                f"<tr{flag}><td>{rank}</td><td class='name'>{html.escape(class_name(c))}</td><td>{thumb(c)}</td>"
                f"<td>{stats['n'][i]}</td><td>{_fmt(stats['accuracy'][i])}</td><td>{_fmt(stats['score'][i], 2)}</td>"
                f"<td class='name'>{html.escape(_STAT_LABELS[stats['driver'][i]])}</td>{cells}</tr>"
            )
        sections.append(
            "<h2>Classes ranked by unusual attention</h2><p>z = (class mean − mean of the other classes' images) / "
            "their standard deviation, for the share of map energy in each region; score = the largest z. "
            f"Rows with score ≥ {z_flag} are highlighted. Click a header to sort.</p>"
            "<table class='sortable' id='ranking'><thead><tr><th>rank</th><th class='name'>class</th><th>mean map</th>"
            f"<th>images</th><th>accuracy</th><th>score</th><th class='name'>most unusual</th>{header}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
        )

        # Confusion matrix
        if confusion:
            present = sorted({int(a) for a, _, _ in confusion} | {int(b) for _, b, _ in confusion})
            position = {c: i for i, c in enumerate(present)}
            matrix = np.zeros((len(present), len(present)), np.int64)
            for label, pred, count in confusion:
                matrix[position[int(label)], position[int(pred)]] = count
            row_sums = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
            matrix_rows = []
            for r, c in enumerate(present):
                tds = "".join(
                    f"<td style='background:rgba(40,90,200,{matrix[r, j] / row_sums[r, 0]:.3f})'>{matrix[r, j]}</td>"
                    for j in range(len(present))
                )
                matrix_rows.append(f"<tr><th class='name'>{html.escape(class_name(c))}</th>{tds}</tr>")
            heads = "".join(f"<th>{html.escape(class_name(c))}</th>" for c in present)
            sections.append(
                "<h2>Confusion matrix</h2><p>Rows: label; columns: prediction; shade: share of the row.</p>"
                f"<table><thead><tr><th class='name'>label \\ pred</th>{heads}</tr></thead><tbody>{''.join(matrix_rows)}</tbody></table>"
            )

        # Galleries
        sections.append("<h2>Most suspicious images</h2>")
        for i in order[:top_classes]:
            if not np.isfinite(stats["score"][i]):
                continue
            c, driver = int(stats["classes"][i]), stats["driver"][i]
            rows = _suspicious_rows(connection, driver, gallery_size, c)
            items = _gallery_items(rows, manifest, images, driver)
            sections.append(
                f"<h3>Class {html.escape(class_name(c))}: highest {html.escape(_STAT_LABELS[driver])} share "
                f"(z = {_fmt(stats['score'][i], 2)})</h3><div class='gallery'>{''.join(items)}</div>"
            )
        rows = _suspicious_rows(connection, "corner_max_share", gallery_size)
        items = _gallery_items(rows, manifest, images, "corner_max_share")
        sections.append(f"<h3>All classes: highest corner share</h3><div class='gallery'>{''.join(items)}</div>")

        if error_count:
            lines = "".join(
                f"<tr><td>{index}</td><td class='name'>{html.escape(str(id_))}</td><td class='name'>{html.escape(str(reason))}</td></tr>"
                for index, id_, reason in errors
            )
            more = f"<p>… and {error_count - len(errors)} more (flaxcam query)</p>" if error_count > len(errors) else ""
            sections.append(
                f"<h2>Unreadable inputs ({error_count})</h2><table><thead><tr><th>index</th><th class='name'>id</th>"
                f"<th class='name'>reason</th></tr></thead><tbody>{lines}</tbody></table>{more}"
            )
    finally:
        connection.close()

    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    document = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>flaxcam audit · {html.escape(str(manifest.get('source_spec') or audit_dir.name))}</title>"
        f"<style>{_CSS}</style></head><body><h1>flaxcam audit report</h1>"
        f"<p>{html.escape(str(audit_dir))} · generated {generated} · flaxcam {html.escape(str(manifest.get('flaxcam_version')))}</p>"
        + "".join(sections)
        + f"<script>{_JS}</script></body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, document)
    return out
