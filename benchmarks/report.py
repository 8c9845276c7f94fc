"""Benchmark records → ratios, JSON lines, a Markdown table and a chart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import TUNED_ALLOCATOR_ENV

#: Fields every ``status: "ok"`` record has (the smoke test checks them).
RECORD_FIELDS = (
    "benchmark", "status", "worker", "library", "method", "model", "batch", "size", "dtype", "images_per_s",
    "median_s", "min_s", "max_s", "rounds", "ratio_to_own_forward", "threads", "cpu_affinity", "loadavg_start",
    "loadavg_end", "platform", "device", "devices", "env", "machine", "command",
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
    flax_rate = {(r["method"], r["batch"]): r["images_per_s"] for r in ok
                 if r["library"] == "flaxcam" and (baseline_worker is None or r["worker"] == baseline_worker)}
    baseline = {(r["library"], r["method"], r["batch"]): r["images_per_s"] for r in ok if r["worker"] == baseline_worker}
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


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _best(record: dict) -> str:
    """images/s of the fastest round (the least disturbed one on a shared machine)."""
    return f"{record['batch'] / record['min_s']:.1f}"


def _load(record: dict) -> str:
    start, end = record.get("loadavg_start"), record.get("loadavg_end")
    return "" if not start else f"{start[0]:.1f}→{end[0]:.1f}"


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
    if allocators:
        lines += [f"glibc malloc of the workers: {' and '.join(allocators)} (`--allocator`, see benchmarks/README.md).", ""]
    if part == "peers":
        split = sorted({r.get("devices", 1) for r in ok if r.get("library") == "flaxcam" and r.get("platform") == "cpu"})
        if split and split != [1]:
            lines += [(f"flaxcam's CPU split into {', '.join(map(str, split))} XLA device(s) (`--cpu-devices`), the batch "
                       "sharded over them (its forward pass too); the PyTorch peers as usual."), ""]
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
            lines += [("Peak memory: measured in a second worker with glibc's default allocator, one call per "
                       "candidate after warm-up (the timing workers' tuned allocator keeps every freed buffer)."), ""]
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
        for r in problems:
            lines.append(f"- {r.get('worker', r['library'])} {r['model']} {r['library']} {r['method']}: "
                         f"{r['status']} — {r.get('error') or r.get('reason')}")
    return "\n".join(lines) + "\n"


def chart(part: str, records: list[dict], path: Path) -> None:
    """Bars per model (peers, cpu-gap) or images/s and peak memory against batch size (scaling)."""
    from matplotlib.figure import Figure

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
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
                memory.plot([r["batch"] for r in rows], [r.get("device_peak_mib") or r.get("peak_rss_mib") for r in rows],
                            marker=marker, label=label)
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
            labels = [f"{r['worker'] if part == 'cpu_gap' else r['library']}\n{r['method']}" for r in subset]
            colors = ["tab:blue" if r["library"] == "flaxcam" else "tab:gray" for r in subset]
            ax.bar(range(len(subset)), [r["images_per_s"] for r in subset], color=colors)
            ax.set_xticks(range(len(subset)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("images/s")
            first = subset[0]
            ax.set_title(f"{model}, batch {first['batch']}, {first['size'][0]}x{first['size'][1]}, "
                         f"{first['dtype']}, {first['device']} (blue: flaxcam, gray: PyTorch)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write(part: str, records: list[dict], out: Path, stem: str, command: str, machine: dict, seconds: float) -> list[Path]:
    """``<stem>.jsonl``, ``<stem>.md`` and ``<stem>.png`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md, png = out / f"{stem}.jsonl", out / f"{stem}.md", out / f"{stem}.png"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = markdown(part, records, command, machine, seconds)
    md.write_text(table)
    print(table, flush=True)
    chart(part, records, png)
    return [jsonl, md, png] if png.exists() else [jsonl, md]
