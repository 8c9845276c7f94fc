"""Throughput of ``flaxcam.data.iterate_batches`` on HAM10000-sized JPEGs (450x600 → model inputs).

    python -m benchmarks.data_loading [--images 512] [--batch 32] [--size 224 224]
                                      [--workers 0 2] [--threads 2] [--rounds 3] [--dir DIR]
                                      [--fast-jpeg]   # also time fast_jpeg=True for each setting
    python -m benchmarks.data_loading --memory 20000    # resident memory over a long pass

Writes a generated HAM10000-layout fixture (``make_ham10000_fixture``, 450x600 JPEGs) once, then times
full passes over it (read, decode, resize, normalize, batch) for each ``worker_count``, interleaved
round by round. The first pass of each setting is a warm-up (page cache) and is not counted;
images/s is from the median of the other rounds, with the time to the first batch (worker processes
start anew on every pass) and the rate after it. Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from flaxcam.data import Ham10000Source, Record, iterate_batches, make_ham10000_fixture
from flaxcam.imageio import Preprocessing


def _one_pass(source, preprocessing, batch, workers, threads, fast) -> tuple[float, float, int]:
    """(seconds for the pass, seconds to the first batch, valid images)."""
    start = time.perf_counter()
    first = None
    count = 0
    for b in iterate_batches(source, preprocessing, batch, worker_count=workers, read_threads=threads, fast_jpeg=fast):
        first = time.perf_counter() - start if first is None else first
        count += int(b.valid.sum())
    return time.perf_counter() - start, first or 0.0, count


def _resident_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _GeneratedSource:
    """``count`` distinct random 120x160 images made on the fly (no large array held in memory)."""

    class_names = tuple("0123456789")

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Record:
        image = np.random.default_rng(index).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        return Record(index, str(index), image, index % 10)


def memory_curve(count: int, batch: int = 64, every: int = 50) -> list[tuple[int, float]]:
    """(images read, resident MB) every ``every`` batches over one pass of ``count`` images at 96x96."""
    points = []
    for k, _ in enumerate(iterate_batches(_GeneratedSource(count), Preprocessing((96, 96)), batch)):
        if k % every == 0:
            points.append((k * batch, round(_resident_mb(), 1)))
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224))
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 2))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="fixture folder (default: a temporary one)")
    parser.add_argument("--fast-jpeg", action="store_true", help="also time fast_jpeg=True")
    parser.add_argument("--memory", type=int, default=0, help="instead: resident memory over a pass of N images")
    args = parser.parse_args(argv)
    if args.memory:
        print(
            json.dumps(
                {"benchmark": "iterate_batches_memory", "images": args.memory, "resident_mb": memory_curve(args.memory)}
            )
        )
        return
    root = args.dir or Path(tempfile.mkdtemp(prefix="flaxcam_data_bench_"))
    per_class = -(-args.images // 7)
    if not (root / "HAM10000_metadata.csv").exists():
        make_ham10000_fixture(root, per_class=per_class)
    source = Ham10000Source(root)
    preprocessing = Preprocessing(tuple(args.size))
    settings = [(w, fast) for w in args.workers for fast in ((False, True) if args.fast_jpeg else (False,))]
    timings: dict[tuple[int, bool], list[tuple[float, float]]] = {s: [] for s in settings}
    for round_ in range(args.rounds + 1):
        for workers, fast in settings:
            seconds, first, count = _one_pass(source, preprocessing, args.batch, workers, args.threads, fast)
            if count != len(source):
                raise RuntimeError(f"pass read {count} valid images of {len(source)}")
            if round_ > 0:
                timings[(workers, fast)].append((seconds, first))
    for (workers, fast), pairs in timings.items():
        values = [seconds for seconds, _ in pairs]
        median = statistics.median(values)
        first = statistics.median(f for _, f in pairs)
        after_first = len(source) - args.batch
        print(
            json.dumps(
                {
                    "benchmark": "iterate_batches",
                    "images": len(source),
                    "image_size": [450, 600],
                    "input_size": list(args.size),
                    "batch": args.batch,
                    "worker_count": workers,
                    "fast_jpeg": fast,
                    "read_threads": args.threads,
                    "images_per_s": round(len(source) / median, 1),
                    "first_batch_s": round(first, 2),
                    "images_per_s_after_first_batch": round(after_first / max(median - first, 1e-9), 1),
                    "seconds": [round(v, 3) for v in values],
                    "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(),
                }
            )
        )


if __name__ == "__main__":
    main()
