"""The audit over 1, 2, ... processes on the same total CPU cores: the cost of the multi-process path.

    python -m benchmarks processes [--processes 1 2] [--images 2048] [--size 64] [--batch 64]
                                   [--model small_cnn] [--out benchmarks/results]

For each process count N, N processes (``flaxcam.distributed.initialize`` with a coordinator on
``127.0.0.1``) audit the same :class:`benchmarks.audit_memory.GeneratedSource` into one folder, each
pinned to its share of the cores (``os.sched_setaffinity``: N disjoint sets covering the cores this
command may use) with one XLA CPU device. Every process first audits a warm-up folder (compilation
excluded), meets the others at a barrier, then runs the timed audit; images/s is the image count over
the slowest process's time from the barrier to its end. The ratio to one process is the overhead of
running several processes where no core is added (an upper bound of the per-host cost: on a pod, each
process brings its own host). Writes ``processes_<platform>.jsonl`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def core_sets(cores: list[int], count: int) -> list[list[int]]:
    """``cores`` split into ``count`` disjoint, near-equal, non-empty sets (process ``i`` gets set ``i``)."""
    if not 1 <= count <= len(cores):
        raise ValueError(f"{count} processes need at least {count} cores, this command may use {len(cores)}")
    return [cores[i * len(cores) // count : (i + 1) * len(cores) // count] for i in range(count)]


# ------------------------------------------------------------------------------------------ one process


def worker(spec: dict) -> dict:
    """One process of a run (``spec``: out, images, size, batch, model, port, count, process, cores)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cores"])
    from flaxcam import distributed

    if spec["count"] > 1:
        distributed.initialize(f"127.0.0.1:{spec['port']}", spec["count"], spec["process"], timeout=120)
    import jax

    from benchmarks.audit_memory import GeneratedSource
    from benchmarks.audit_throughput import _model
    from flaxcam import audit
    from flaxcam.imageio import Preprocessing

    model, variables = _model(spec["model"], spec["size"])
    preprocessing = Preprocessing((spec["size"], spec["size"]))
    out = Path(spec["out"])
    common = {"preprocessing": preprocessing, "batch_size": spec["batch"], "progress": False}
    warm = spec["batch"] * spec["count"]  # one batch per process: compiles what the timed run uses
    audit.run(GeneratedSource(warm, spec["size"]), model, variables, out / "warmup", **common)
    distributed.barrier("flaxcam-bench-start")
    started = time.perf_counter()
    result = audit.run(GeneratedSource(spec["images"], spec["size"]), model, variables, out / "audit", **common)
    seconds = time.perf_counter() - started
    assert result.complete, result
    return {
        "process": spec["process"],
        "processed": result.processed,
        "seconds": round(seconds, 3),
        "cores": spec["cores"],
        "local_devices": len(jax.local_devices()),
    }


# ------------------------------------------------------------------------------------------ one count


def run_count(args: argparse.Namespace, count: int, scratch: Path) -> dict:
    """N processes auditing ``args.images`` images; their records and the audit's images/s."""
    port, sets = _free_port(), core_sets(_cores(), count)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
    }
    out = scratch / f"n{count}"
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    processes: list[subprocess.Popen] = []
    for index, cores in enumerate(sets):
        spec = {
            "out": str(out),
            "images": args.images,
            "size": args.size,
            "batch": args.batch,
            "model": args.model,
            "port": port,
            "count": count,
            "process": index,
            "cores": cores,
        }
        command = [sys.executable, "-m", "benchmarks.processes", "--worker", json.dumps(spec)]
        processes.append(subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for child in processes:
        try:
            stdout, stderr = child.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise RuntimeError(f"{count} processes: a process ran past {args.timeout} s") from None
        if child.returncode != 0:
            raise RuntimeError(f"{count} processes: a process failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    slowest = max(r["seconds"] for r in results)
    return {
        "processes": count,
        "images": args.images,
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "cores": sum(len(s) for s in sets),
        "seconds": slowest,
        "images_per_second": round(args.images / slowest, 2),
        "wall_seconds_with_startup": round(time.perf_counter() - started, 2),
        "per_process": results,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def markdown(records: list[dict], command: str, machine: dict) -> str:
    base = next((r for r in records if r["processes"] == 1), None)
    lines = [
        "<!-- written by python -m benchmarks processes -->",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPUs; each process pinned to its share of the "
        f"cores, one XLA CPU device each. Audit of {records[0]['images']} generated {records[0]['size']}x"
        f"{records[0]['size']} images, {records[0]['model']}, CAM, batch {records[0]['batch']}; compilation "
        "excluded (a warm-up audit first), images/s over the slowest process.",
        "",
        "| processes | cores | seconds (slowest process) | images/s | ratio to 1 process | per process (s) "
        "| wall incl. start-up (s) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = f"{r['images_per_second'] / base['images_per_second']:.2f}" if base else ""
        per = " / ".join(f"{p['seconds']:.1f}" for p in r["per_process"])
        lines.append(
            f"| {r['processes']} | {r['cores']} | {r['seconds']:.2f} | {r['images_per_second']:.1f} | {ratio} | {per} "
            f"| {r['wall_seconds_with_startup']:.1f} | {r['load_before']}→{r['load_after']} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: str) -> list[Path]:
    """Every ``--processes`` count in turn; writes the records and the table, returns their paths."""
    from flaxcam.bench import runner

    machine = runner.machine_info()
    records = []
    with tempfile.TemporaryDirectory(prefix="flaxcam-bench-processes-") as scratch:
        for count in args.processes:
            print(f"[bench] processes: {count} process(es), {args.images} images", flush=True)
            record = run_count(args, count, Path(scratch))
            record.update({"benchmark": "processes", "command": command, "machine": machine})
            records.append(record)
    base = next((r for r in records if r["processes"] == 1), None)
    for record in records:
        record["ratio_to_one_process"] = (
            round(record["images_per_second"] / base["images_per_second"], 3) if base else None
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "processes_cpu"
    jsonl, md = args.out / f"{stem}.jsonl", args.out / f"{stem}.md"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = markdown(records, command, machine)
    md.write_text(table)
    print(table, flush=True)
    return [jsonl, md]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    parser.add_argument("--images", type=int, default=2048, help="images audited per count")
    parser.add_argument("--size", type=int, default=64, help="image side (square)")
    parser.add_argument("--batch", type=int, default=64, help="images per jitted call in each process")
    parser.add_argument("--model", default="small_cnn", help="small_cnn or a registry model (resnet18, ...)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a process may run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for .jsonl/.md")
    parser.add_argument("--name", default=None, help="file name stem (default processes_cpu)")


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))), flush=True)
        return []
    parser = argparse.ArgumentParser(prog="python -m benchmarks processes", description=__doc__)
    add_arguments(parser)
    command = "python -m benchmarks processes " + " ".join(shlex.quote(a) for a in argv)
    return run(parser.parse_args(argv), command)


if __name__ == "__main__":
    main()
