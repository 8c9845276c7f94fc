"""Benchmark records → ratios, JSON lines, a Markdown table and a chart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flaxcam.bench.runner import TUNED_ALLOCATOR_ENV

#: Fields every ``status: "ok"`` record has (the smoke test checks them).
RECORD_FIELDS = (
    "benchmark",
    "status",
    "worker",
    "library",
    "method",
    "model",
    "batch",
    "size",
    "dtype",
    "images_per_s",
    "median_s",
    "min_s",
    "max_s",
    "rounds",
    "ratio_to_own_forward",
    "threads",
    "cpu_affinity",
    "loadavg_start",
    "loadavg_end",
    "platform",
    "device",
    "devices",
    "env",
    "machine",
    "command",
)


def _own_forward_key(record: dict) -> tuple:
    library = "flaxcam" if record["library"] == "flaxcam" else "torch"
    return (record["worker"] if library == "flaxcam" else None, library, record["batch"])


def add_ratios(records: list[dict], baseline_worker: str | None = None) -> list[dict]:
    """Add ``ratio_to_own_forward`` (to the same library's forward pass at the same batch, in the same
    worker for flaxcam), ``flaxcam_speedup`` (flaxcam's same method at the same batch over this one)
    and, with ``baseline_worker``, ``ratio_to_baseline`` (to the same candidate in that worker)."""
    ok = [r for r in records if r.get("status") == "ok"]
    forward = {}
    for r in ok:
        if r["method"] == "forward":
            library = "flaxcam" if r["library"] == "flaxcam" else "torch"
            forward[(r["worker"] if library == "flaxcam" else None, library, r["batch"])] = r["images_per_s"]
    flax_rate = {
        (r["method"], r["batch"]): r["images_per_s"]
        for r in ok
        if r["library"] == "flaxcam" and (baseline_worker is None or r["worker"] == baseline_worker)
    }
    baseline = {
        (r["library"], r["method"], r["batch"]): r["images_per_s"] for r in ok if r["worker"] == baseline_worker
    }
    for r in ok:
        own = forward.get(_own_forward_key(r))
        r["ratio_to_own_forward"] = round(r["images_per_s"] / own, 3) if own else None
        mine = flax_rate.get((r["method"], r["batch"]))
        r["flaxcam_speedup"] = round(mine / r["images_per_s"], 3) if mine and r["library"] != "flaxcam" else None
        if baseline_worker is not None:
            base = baseline.get(("flaxcam" if r["library"] == "flaxcam" else r["library"], r["method"], r["batch"]))
            if r["library"] == "flaxcam" and base:
                r["ratio_to_baseline"] = round(r["images_per_s"] / base, 3)
    return records


def derive(records: list[dict]) -> list[dict]:
    """Add what a ``flaxcam bench`` record is read with, from the records of the same worker:

    * ``latency_ms``: the median call at batch 1;
    * for the score-based methods (``forward_passes_per_image`` P): ``floor_images_per_s``, the forward
      rate at batch ``chunk_size`` divided by P, and ``ratio_to_floor``;
    * with the time-split pieces (``--profile``): ``time_split_s`` and ``time_share`` of each method's
      median call — forward (the jitted forward pass), backward to the layer (Grad-CAM's call less its
      post-processing and the forward pass, for methods that take gradients), post-processing (explain's
      ReLU, min-max, resize, min-max jitted alone) and the method (the rest). Differences of medians:
      each is clipped at 0, and the split is as exact as the machine is quiet.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    median = {(r["worker"], r["method"], r["batch"]): r["median_s"] for r in ok}
    for r in ok:
        if r["library"] != "flaxcam":
            continue
        if r["batch"] == 1:
            r["latency_ms"] = round(r["median_s"] * 1000, 3)
        if r["method"] in ("forward", "forward+backward", "postprocess"):
            continue
        passes, chunk = r.get("forward_passes_per_image"), r.get("chunk_size")
        chunk_forward = median.get((r["worker"], "forward", chunk)) if chunk else None
        if passes and chunk_forward:
            floor = chunk / chunk_forward / passes
            r["floor_images_per_s"] = round(floor, 4)
            r["ratio_to_floor"] = round(r["images_per_s"] / floor, 3)
        pieces = [
            median.get((r["worker"], piece, r["batch"])) for piece in ("forward", "forward+backward", "postprocess")
        ]
        if None in pieces:
            continue
        forward, probe, post = (float(p) for p in pieces if p is not None)
        backward = max(0.0, probe - post - forward) if r.get("needs_gradients") else 0.0
        method = max(0.0, r["median_s"] - forward - backward - post)
        split = {"forward": forward, "backward_to_layer": backward, "method": method, "postprocess": post}
        total = sum(split.values()) or 1.0
        r["time_split_s"] = {k: float(f"{v:.4g}") for k, v in split.items()}
        r["time_share"] = {k: round(v / total, 3) for k, v in split.items()}
    return records


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _best(record: dict) -> str:
    """images/s of the fastest round (the least disturbed one on a shared machine)."""
    return f"{record['batch'] / record['min_s']:.1f}"


def _load(record: dict) -> str:
    start, end = record.get("loadavg_start"), record.get("loadavg_end")
    return "" if not start or not end else f"{start[0]:.1f}→{end[0]:.1f}"


def allocator_name(env: dict) -> str:
    """``"tuned"`` when a worker ran with the benchmark's malloc settings, else ``"default"``."""
    return "tuned" if all(env.get(key) == value for key, value in TUNED_ALLOCATOR_ENV.items()) else "default"


def markdown(part: str, records: list[dict], command: str, machine: dict, seconds: float) -> str:
    """A Markdown report: the command, the machine, one table, then skipped/failed candidates."""
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines = [
        f"<!-- written by {command} -->",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s in all.",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPUs, {machine.get('memory_gib')} GiB; {versions}.",
        "",
    ]
    ok = [r for r in records if r.get("status") == "ok"]
    allocators = sorted({allocator_name(r.get("env") or {}) for r in ok})
    if allocators and part != "bench":
        lines += [
            f"glibc malloc of the workers: {' and '.join(allocators)} (`--allocator`, see benchmarks/README.md).",
            "",
        ]
    if part == "peers":
        split = sorted(
            {r.get("devices", 1) for r in ok if r.get("library") == "flaxcam" and r.get("platform") == "cpu"}
        )
        if split and split != [1]:
            lines += [
                (
                    f"flaxcam's CPU split into {', '.join(map(str, split))} XLA device(s) (`--cpu-devices`), the batch "
                    "sharded over them (its forward pass too); the PyTorch peers as usual."
                ),
                "",
            ]
        lines += [
            "| model | library | method | batch | size | dtype | images/s | best round | ratio to own forward | flaxcam's speedup over it | threads | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ok:
            lines.append(
                f"| {r['model']} | {r['library']} | {r['method']} | {r['batch']} | {r['size'][0]}x{r['size'][1]} | "
                f"{r['dtype'] if r['library'] == 'flaxcam' else 'float32'} | {r['images_per_s']:.1f} | {_best(r)} | "
                f"{_fmt(r.get('ratio_to_own_forward'))} | {_fmt(r.get('flaxcam_speedup'), '.2f', '×')} | "
                f"{_fmt(r.get('threads'), 'd')} | {_load(r)} |"
            )
    elif part == "scaling":
        if any(r.get("memory_allocator") == "default" for r in ok):
            lines += [
                (
                    "Peak memory: measured in a second worker with glibc's default allocator, one call per "
                    "candidate after warm-up (the timing workers' tuned allocator keeps every freed buffer)."
                ),
                "",
            ]
        lines += [
            "| model | method | size | devices | batch | images/s | ratio to forward | peak RSS (MiB) | RSS before (MiB) | device peak (MiB) | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ok:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['size'][0]}x{r['size'][1]} | {r['devices']} | {r['batch']} | "
                f"{r['images_per_s']:.1f} | {_fmt(r.get('ratio_to_own_forward'))} | {_fmt(r.get('peak_rss_mib'), '.0f')} | "
                f"{_fmt(r.get('rss_before_mib'), '.0f')} | {_fmt(r.get('device_peak_mib'), '.0f')} | {_load(r)} |"
            )
    elif part == "bench":
        first = ok[0] if ok else {}
        lines += (
            [
                (
                    f"Devices: {first.get('devices')} × {first.get('device')} ({first.get('platform')}); layer "
                    f"{first.get('layer')}; XLA_FLAGS `{first.get('xla_flags') or ''}`."
                ),
                "",
            ]
            if ok
            else []
        )
        lines += [
            "| model | library | method | batch | size | dtype | images/s | best round | ratio to own forward | "
            "first call (s) | latency (ms) | peak memory (MiB) | forward passes / image | ratio to floor | "
            "forward / backward / method / post (%) | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ok:
            share = r.get("time_share")
            shares = (
                ""
                if not share
                else " / ".join(
                    f"{100 * share[k]:.0f}" for k in ("forward", "backward_to_layer", "method", "postprocess")
                )
            )
            memory = r.get("device_peak_mib")
            memory = f"{memory:.0f} (device)" if memory is not None else _fmt(r.get("peak_rss_mib"), ".0f", " (RSS)")
            lines.append(
                f"| {r['model']} | {r['library']} | {r['method']} | {r['batch']} | {r['size'][0]}x{r['size'][1]} | "
                f"{r['dtype'] if r['library'] == 'flaxcam' else 'float32'} | {r['images_per_s']:.1f} | {_best(r)} | "
                f"{_fmt(r.get('ratio_to_own_forward'))} | {_fmt(r.get('first_call_s'), '.2f')} | "
                f"{_fmt(r.get('latency_ms'), '.1f')} | {memory} | {_fmt(r.get('forward_passes_per_image'), 'd')} | "
                f"{_fmt(r.get('ratio_to_floor'), '.2f')} | "
                f"{shares} | {_load(r)} |"
            )
    else:
        lines += [
            "| configuration | library | method | batch | images/s | best round | ratio to the default | ratio to own forward | threads | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ok:
            lines.append(
                f"| {r['worker']} | {r['library']} | {r['method']} | {r['batch']} | {r['images_per_s']:.1f} | {_best(r)} | "
                f"{_fmt(r.get('ratio_to_baseline'), '.3f')} | {_fmt(r.get('ratio_to_own_forward'))} | "
                f"{_fmt(r.get('threads'), 'd')} | {_load(r)} |"
            )
    problems = [r for r in records if r.get("status") != "ok"]
    if problems:
        lines += ["", "Not measured:", ""]
        seen = set()
        for r in problems:
            line = (
                r.get("worker", r["library"]),
                r["model"],
                r["library"],
                r["method"],
                r.get("error") or r.get("reason"),
            )
            if line in seen:  # the same error at every batch size: listed once
                continue
            seen.add(line)
            lines.append(
                f"- {r.get('worker', r['library'])} {r['model']} {r['library']} {r['method']}: "
                f"{r['status']} — {r.get('error') or r.get('reason')}"
            )
    return "\n".join(lines) + "\n"


def chart(part: str, records: list[dict], path: Path) -> None:
    """Bars per model (peers, cpu-gap) or images/s and peak memory against batch size (scaling)."""
    from matplotlib.figure import Figure

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return
    if part == "bench":
        _bench_chart(ok, path)
        return
    if part == "scaling":
        figure = Figure(figsize=(11, 4))
        speed, memory = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
        curves: dict[tuple, list[dict]] = {}
        for r in ok:
            curves.setdefault((r["method"], r["size"][0], r["size"][1], r["devices"]), []).append(r)
        for (method, height, width, devices), rows in sorted(curves.items()):
            rows.sort(key=lambda r: r["batch"])
            label = f"{method} {height}x{width}" + (f" {devices} dev" if devices != 1 else "")
            marker = "o" if len(rows) > 1 else "s"
            speed.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], marker=marker, label=label)
            if method != "forward":
                memory.plot(
                    [r["batch"] for r in rows],
                    [r.get("device_peak_mib") or r.get("peak_rss_mib") or 0.0 for r in rows],
                    marker=marker,
                    label=label,
                )
        for ax, ylabel in ((speed, "images/s"), (memory, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        speed.set_title(f"{ok[0]['model']}, {ok[0]['dtype']}, {ok[0]['device']}")
        memory.set_title("peak memory while explaining (device, else host RSS)")
    else:
        groups = sorted({r["model"] for r in ok})
        figure = Figure(figsize=(11, 3.8 * len(groups)))
        for row, model in enumerate(groups):
            ax = figure.add_subplot(len(groups), 1, row + 1)
            subset = [r for r in ok if r["model"] == model]
            labels = [f"{r['worker'] if part in ('cpu_gap', 'nnx') else r['library']}\n{r['method']}" for r in subset]
            colors = ["tab:blue" if r["library"] == "flaxcam" else "tab:gray" for r in subset]
            ax.bar(range(len(subset)), [r["images_per_s"] for r in subset], color=colors)
            ax.set_xticks(range(len(subset)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("images/s")
            first = subset[0]
            batches = "/".join(str(b) for b in sorted({r["batch"] for r in subset}))
            ax.set_title(
                f"{model}, batch {batches}, {first['size'][0]}x{first['size'][1]}, "
                f"{first['dtype']}, {first['device']} (blue: flaxcam, gray: PyTorch)"
            )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _bench_chart(ok: list[dict], path: Path) -> None:
    """images/s per method at the largest batch (bars), and images/s against batch size per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2))
    bars, curves = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    methods = [r for r in ok if r["method"] not in ("forward+backward", "postprocess")]
    largest = max(r["batch"] for r in methods)
    subset = [r for r in methods if r["batch"] == largest]
    bars.bar(
        range(len(subset)),
        [r["images_per_s"] for r in subset],
        color=["tab:blue" if r["library"] == "flaxcam" else "tab:gray" for r in subset],
    )
    bars.set_xticks(
        range(len(subset)), [f"{r['library']}\n{r['method']}" for r in subset], rotation=60, ha="right", fontsize=7
    )
    bars.set_ylabel("images/s")
    first = subset[0]
    bars.set_title(
        f"{first['model']}, batch {largest}, {first['size'][0]}x{first['size'][1]}, {first['dtype']}, "
        f"{first.get('devices')} × {first.get('device')}",
        fontsize=9,
    )
    lines: dict[tuple[str, str], list[dict]] = {}
    for r in methods:
        lines.setdefault((r["library"], r["method"]), []).append(r)
    for (library, method), rows in lines.items():
        rows.sort(key=lambda r: r["batch"])
        curves.plot(
            [r["batch"] for r in rows],
            [r["images_per_s"] for r in rows],
            marker="o",
            linestyle="-" if library == "flaxcam" else "--",
            label=f"{method}" + ("" if library == "flaxcam" else f" ({library})"),
        )
    curves.set_xscale("log", base=2)
    curves.set_xlabel("batch size")
    curves.set_ylabel("images/s")
    curves.set_title("batch scaling (blue bars, solid lines: flaxcam)", fontsize=9)
    curves.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write(
    part: str, records: list[dict], out: Path, stem: str, command: str, machine: dict, seconds: float
) -> list[Path]:
    """``<stem>.jsonl``, ``<stem>.md`` and ``<stem>.png`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md, png = out / f"{stem}.jsonl", out / f"{stem}.md", out / f"{stem}.png"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = markdown(part, records, command, machine, seconds)
    md.write_text(table)
    print(table, flush=True)
    chart(part, records, png)
    return [jsonl, md, png] if png.exists() else [jsonl, md]
