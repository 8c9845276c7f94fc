"""The benchmark driver: workers in their own processes, timed interleaved round by round.

Every candidate (a library's forward pass or method at one batch size) lives in a worker process
(:mod:`flaxcam.bench.worker`). After warm-up, each round asks every candidate of every worker to run once,
in an order rotated from round to round, so machine noise (this CPU is shared) hits all candidates
alike; images/s come from the median round. Each record carries the load average before and after its
measurement and the thread counts, so a reader can judge how quiet the machine was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

#: The folder holding the ``flaxcam`` package imported here: workers import the same one.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]

#: Packages whose versions go into every record (those installed).
VERSIONED = (
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "torch",
    "torchvision",
    "grad-cam",
    "torchcam",
    "captum",
    "efficientnet-lite-pytorch",
)
#: The peer libraries and the module each needs.
PEER_MODULES = {"torch": "torch", "pytorch-grad-cam": "pytorch_grad_cam", "torchcam": "torchcam", "captum": "captum"}
#: Architectures that have a PyTorch peer on the same weights.
PEER_MODELS = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")


class WorkerError(RuntimeError):
    """A worker process died or answered with an error."""


#: glibc malloc settings given to every worker (flaxcam and torch alike) unless ``--allocator default``:
#: one arena, no ``mmap`` for large blocks and no trimming, so the activation buffers freed after one
#: call are reused by the next instead of being returned to the kernel and page-faulted in again (with
#: glibc's defaults a ResNet-50 forward pass at batch 16 took about 68,000 minor page faults per call
#: under XLA and 307,000 under torch: ``python -m benchmarks.page_faults``, benchmarks/README.md).
TUNED_ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
}


class Worker:
    """One worker process (``python -m flaxcam.bench.worker``) with its own environment. It imports the
    same flaxcam as this process, runs in this process's working directory and can import what this
    process can (``PYTHONPATH`` = this process's ``sys.path``), so a user's ``package.module:factory``
    model loads there too."""

    def __init__(self, name: str, spec: dict[str, Any], env: dict[str, str] | None = None, cpus: int | None = None):
        self.name = name
        self.spec = spec
        self.env = dict(env or {})
        full_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ, **self.env}  # GPU: share it with torch
        full_env["PYTHONPATH"] = os.pathsep.join(worker_path())
        affinity = None
        if cpus is not None and hasattr(os, "sched_getaffinity"):
            available = sorted(os.sched_getaffinity(0))
            affinity = set(available[: max(1, min(cpus, len(available)))])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flaxcam.bench.worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("FLAXCAM_BENCH_VERBOSE") else subprocess.DEVNULL,
            text=True,
            env=full_env,
            # the driver runs no threads of its own, so preexec_fn is safe here
            preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None,
        )
        assert self.process.stdin is not None and self.process.stdout is not None  # both piped above
        self._stdin: IO[str] = self.process.stdin
        self._stdout: IO[str] = self.process.stdout
        hello = self._read()
        self.candidates: list[str] = hello["candidates"]
        self.errors: dict[str, str] = hello["errors"]
        self.info: dict[str, Any] = hello["info"]

    def _read(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if not line:
            self.process.wait()
            raise WorkerError(
                f"worker {self.name} exited with status {self.process.returncode} "
                "(rerun with FLAXCAM_BENCH_VERBOSE=1 to see its stderr)"
            )
        message = json.loads(line)
        if "fatal" in message or "error" in message:
            raise WorkerError(f"worker {self.name}: {message.get('fatal') or message.get('error')}")
        return message

    def request(self, op: str, key: str | None = None, **fields: Any) -> dict[str, Any]:
        self._stdin.write(json.dumps({"op": op, "key": key, **fields}) + "\n")
        self._stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._stdin.flush()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def start_workers(
    specs: Iterable[tuple[str, dict[str, Any], dict[str, str], int | None]],
) -> list[Worker | _FailedWorker]:
    """Start workers one after the other (``(name, spec, env, cpus)`` each); a worker that fails to
    start is reported and kept as a :class:`_FailedWorker` (its error becomes a record)."""
    workers: list[Worker | _FailedWorker] = []
    for name, spec, env, cpus in specs:
        print(f"[bench]   starting worker {name!r} (build, compile, warm up)", file=sys.stderr, flush=True)
        try:
            workers.append(Worker(name, spec, env, cpus))
        except WorkerError as err:
            print(f"[bench] {err}", file=sys.stderr, flush=True)
            workers.append(_FailedWorker(name, spec, env, str(err)))
    return workers


@dataclasses.dataclass
class _FailedWorker:
    name: str
    spec: dict
    env: dict
    message: str
    candidates: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def errors(self) -> dict[str, str]:
        return {f"{self.spec['library']} *": self.message}

    def close(self) -> None:
        pass


def measure(workers: list[Worker], rounds: int, memory: bool = False) -> list[dict[str, Any]]:
    """Time every candidate of every worker ``rounds`` times, interleaved; one record per candidate
    (and one ``status: "error"`` record per candidate that could not run)."""
    order = [(worker, key) for worker in workers for key in worker.candidates]
    timings: dict[tuple[str, str], list[float]] = {(w.name, k): [] for w, k in order}
    load_start = os.getloadavg()
    started = time.time()
    for round_index in range(rounds):
        shift = round_index % max(1, len(order))
        for worker, key in order[shift:] + order[:shift]:
            timings[(worker.name, key)].append(worker.request("run", key)["seconds"])
        print(
            f"[bench]   round {round_index + 1}/{rounds} of {len(order)} candidates done at "
            f"{time.time() - started:.0f} s (load {os.getloadavg()[0]:.1f})",
            file=sys.stderr,
            flush=True,
        )
    load_end = os.getloadavg()
    peaks = {}
    if memory:
        for worker, key in order:
            peaks[(worker.name, key)] = worker.request("memory", key)
    records = []
    for worker in workers:
        for key in worker.candidates:
            values = timings[(worker.name, key)]
            library, rest = key.split(" ", 1)
            method, batch = rest.rsplit("@", 1)
            median = statistics.median(values)
            record = {
                "status": "ok",
                "worker": worker.name,
                "library": library,
                "method": method,
                "batch": int(batch),
                "images_per_s": round(int(batch) / median, 3),
                "median_s": _sig(median),
                "min_s": _sig(min(values)),
                "max_s": _sig(max(values)),
                "rounds": len(values),
                "first_call_s": worker.info.get("first_call_s", {}).get(key),
                "loadavg_start": [round(v, 2) for v in load_start],
                "loadavg_end": [round(v, 2) for v in load_end],
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                **_worker_fields(worker),
            }
            record["best_images_per_s"] = round(int(batch) / min(values), 3)
            method_info = worker.info.get("methods", {}).get(method)
            if method_info:
                record["score"] = method_info["score"]
                record["needs_gradients"] = method_info["needs_gradients"]
                if method_info.get("options"):
                    record["options"] = method_info["options"]
                record["forward_passes_per_image"] = method_info["forward_passes"]
                if method_info["forward_passes"]:
                    record["chunk_size"] = worker.info.get("chunk_size")
            if (worker.name, key) in peaks:
                peak = peaks[(worker.name, key)]
                record.update(memory_fields(peak))
            records.append(record)
        for key, message in worker.errors.items():
            library, rest = key.split(" ", 1)
            method, _, batch = rest.partition("@")
            records.append(
                {
                    "status": "error",
                    "worker": worker.name,
                    "library": library,
                    "method": method,
                    "batch": int(batch) if batch.isdigit() else None,
                    "error": message,
                    **_worker_fields(worker),
                }
            )
    return records


def _sig(seconds: float) -> float:
    """Seconds to 6 significant digits."""
    return float(f"{seconds:.6g}")


def _worker_fields(worker: Worker) -> dict[str, Any]:
    spec, info = worker.spec, worker.info
    fields = {
        "model": spec.get("label") or spec["model"],
        "size": list(info.get("size") or spec["size"]),
        "dtype": spec.get("dtype", "float32"),
        "platform": info.get("platform"),
        "device": info.get("device"),
        "devices": info.get("devices", 1),
        "layer": info.get("layer"),
        "cpu_affinity": info.get("cpu_affinity"),
        "env": worker.env,
        "xla_flags": info.get("xla_flags"),
        "worker_malloc_env": info.get("malloc_env", {}),  # what the worker process saw
    }
    if spec["library"] == "torch":
        fields["threads"] = info.get("torch_threads")
        fields["torch_interop_threads"] = info.get("torch_interop_threads")
    else:  # XLA CPU runs one intra-op thread per core it may use
        fields["threads"] = info.get("cpu_affinity") if info.get("platform") == "cpu" else None
    return fields


def run_workers(
    specs: Sequence[tuple[str, dict[str, Any], dict[str, str], int | None]],
    rounds: int,
    memory: bool = False,
    profile: Path | None = None,
) -> list[dict]:
    """Start the workers, measure them interleaved (with ``profile``, then trace one call per flaxcam
    method into it), stop them."""
    workers = start_workers(specs)
    try:
        running = [w for w in workers if isinstance(w, Worker)]
        records = measure(running, rounds, memory)
        if profile is not None:
            record_profiles(running, records, profile)
        return records + [
            record
            for w in workers
            if isinstance(w, _FailedWorker)
            for record in [
                {
                    "status": "error",
                    "worker": w.name,
                    "library": w.spec["library"],
                    "method": "*",
                    "batch": None,
                    "error": w.message,
                    "model": w.spec.get("label") or w.spec["model"],
                    "size": list(w.spec.get("size") or []),
                    "dtype": w.spec.get("dtype", "float32"),
                    "env": w.env,
                }
            ]
        ]
    finally:
        for worker in workers:
            worker.close()


def record_profiles(workers: list[Worker], records: list[dict], folder: Path) -> None:
    """One ``jax.profiler`` trace per flaxcam method at its largest measured batch, in
    ``folder/<method>_b<batch>/`` (TensorBoard's or Perfetto's trace viewer reads it); the files are
    added to that method's records as ``profile_files``."""
    for worker in workers:
        if worker.spec["library"] != "flaxcam":
            continue
        largest: dict[str, int] = {}
        for key in worker.candidates:
            method, batch = key.split(" ", 1)[1].rsplit("@", 1)
            if method not in PIECES and int(batch) in worker.spec["batches"]:
                largest[method] = max(largest.get(method, 0), int(batch))
        for method, size in largest.items():
            target = Path(folder) / f"{method.replace('/', '_')}_b{size}"
            files = worker.request("profile", f"flaxcam {method}@{size}", dir=str(target))["files"]
            for record in records:
                if record.get("worker") == worker.name and record.get("method") == method:
                    record["profile_files"] = files
            print(f"[bench]   trace of {method} at batch {size}: {target}", file=sys.stderr, flush=True)


#: Candidates that are pieces of the time split, not methods.
PIECES = ("forward+backward", "postprocess")


def memory_fields(peak: dict[str, Any]) -> dict[str, float]:
    """A worker's answer to a ``memory`` request as record fields in MiB."""
    fields = {
        "peak_rss_mib": round(peak["peak_rss_bytes"] / 2**20, 1),
        "rss_before_mib": round(peak["base_rss_bytes"] / 2**20, 1),
    }
    if peak.get("device_peak_bytes") is not None:
        fields["device_peak_mib"] = round(peak["device_peak_bytes"] / 2**20, 1)
    return fields


def measure_peak_memory(name: str, spec: dict, env: dict, cpus: int | None) -> dict[str, dict[str, float]]:
    """``{candidate key: {"peak_rss_mib", "rss_before_mib"[, "device_peak_mib"]}}`` from a fresh worker
    that runs each candidate once after warm-up (no timing). The scaling benchmark measures memory this
    way, with glibc's default allocator: its timing workers run with the tuned allocator, which never
    returns freed memory, so their resident set only ever grows and cannot show a per-batch peak."""
    peaks: dict[str, dict[str, float]] = {}
    for worker in start_workers([(name, spec, env, cpus)]):
        try:
            if isinstance(worker, Worker):
                for key in worker.candidates:
                    peaks[key] = memory_fields(worker.request("memory", key))
        finally:
            worker.close()
    return peaks


# ---------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------


def missing_peers() -> dict[str, str]:
    """``{library: reason}`` for each peer library that is not installed."""
    missing = {}
    for library, module in PEER_MODULES.items():
        if importlib.util.find_spec(module) is None:
            missing[library] = f"{module} is not installed (pip install -e '.[parity]')"
    return missing


def shared_weights(model: str, folder: Path) -> Path | None:
    """A torchvision ``model`` with seeded random weights saved to ``folder`` (in a subprocess, so this
    process never imports torch); both workers load this file. None when torch is not installed."""
    if not model.startswith("resnet") or importlib.util.find_spec("torch") is None:
        return None
    path = folder / f"{model}_seed0.pth"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        code = f"from flaxcam.bench.torch_ref import save_seeded_resnet; save_seeded_resnet({model!r}, {str(path)!r})"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(worker_path()), "JAX_PLATFORMS": "cpu"}
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return path


def worker_path() -> list[str]:
    """``PYTHONPATH`` entries of a worker: this flaxcam's folder first, then this process's path."""
    entries = [str(PACKAGE_PARENT), *(p or os.getcwd() for p in sys.path)]
    return list(dict.fromkeys(e for e in entries if e and Path(e).exists()))


def machine_info() -> dict[str, Any]:
    """CPU, memory, Python and library versions of this machine (no jax import needed)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {}
    for package in (*VERSIONED, "flaxcam"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
