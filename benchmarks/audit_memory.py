"""Resident memory of a long audit: audit ≥ 20,000 generated images and sample the RSS over time.

    python -m benchmarks.audit_memory [--count 20000] [--size 64] [--batch 64] [--out benchmarks/results/audit_memory_cpu]

The images are generated on the fly by :class:`GeneratedSource` (a deterministic function of the index:
noise, a bright square at a random place, a class label), so the source itself holds nothing and the
curve shows the audit pipeline's memory only. A thread samples ``VmRSS`` from ``/proc/self/status``
every ``--interval`` seconds together with the number of images done. Writes ``OUT.json`` (samples,
settings, machine) and ``OUT.png`` (RSS and images done against time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


class GeneratedSource:
    """``count`` synthetic RGB images of ``size × size``, generated from the index (no storage)."""

    def __init__(self, count: int, size: int = 64, classes: int = 10):
        self.count, self.size = count, size
        self.class_names = tuple(f"c{i}" for i in range(classes))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        from flaxcam.data import Record

        index = int(index)
        rng = np.random.default_rng(index)
        image = rng.integers(0, 90, (self.size, self.size, 3), dtype=np.uint8)
        side = self.size // 4
        y, x = rng.integers(0, self.size - side, 2)
        image[y : y + side, x : x + side] = rng.integers(150, 256, 3, dtype=np.uint8)
        box = (float(x), float(y), float(x + side), float(y + side))
        return Record(index=index, id=f"gen:{index}", image=image, label=int(index % len(self.class_names)), box=box)


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.throughput import machine_info
    from flaxcam import audit
    from flaxcam.imageio import Preprocessing
    from flaxcam.models.small import small_cnn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/audit_memory_cpu"))
    args = parser.parse_args()

    source = GeneratedSource(args.count, args.size)
    model = small_cnn(10, (16, 32, 64))
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)))
    preprocessing = Preprocessing((args.size, args.size), mean=(0.3, 0.3, 0.3), std=(0.3, 0.3, 0.3))
    work = Path(tempfile.mkdtemp(prefix="flaxcam-audit-memory-"))
    samples: list[tuple[float, float, int]] = []
    done = [0]
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - start, rss_mib(), done[0]))
            stop.wait(args.interval)

    def on_batch(count: int) -> None:
        done[0] = count

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = audit.run(
            source,
            model,
            variables,
            work / "audit",
            preprocessing=preprocessing,
            batch_size=args.batch,
            progress=True,
            on_batch=on_batch,
        )
    finally:
        stop.set()
        sampler.join()
        shutil.rmtree(work, ignore_errors=True)
    samples.append((time.perf_counter() - start, rss_mib(), done[0]))
    times, rss, images = (np.array(column) for column in zip(*samples))
    after_warmup = rss[images >= min(2000, args.count // 10)]
    report = {
        "benchmark": "audit_memory",
        "count": args.count,
        "size": args.size,
        "batch": args.batch,
        "model": "small_cnn (16, 32, 64)",
        "method": "cam",
        "seconds": round(float(times[-1]), 2),
        "images_per_second": round(result.images_per_second, 1),
        "rss_mib_first_sample": round(float(rss[0]), 1),
        "rss_mib_peak": round(float(rss.max()), 1),
        "rss_mib_after_2000_images": {
            "min": round(float(after_warmup.min()), 1),
            "max": round(float(after_warmup.max()), 1),
        },
        "rss_mib_growth_after_2000_images": round(float(after_warmup[-1] - after_warmup[0]), 1),
        "machine": machine_info(),
        "samples": [{"t": round(t, 2), "rss_mib": round(r, 1), "images": int(n)} for t, r, n in samples],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in report["samples"]]
    figure, left = plt.subplots(figsize=(7, 3.6), dpi=120)
    left.plot(t, [s["rss_mib"] for s in report["samples"]], color="tab:red")
    left.set_xlabel("seconds")
    left.set_ylabel("resident memory (MiB)", color="tab:red")
    left.set_ylim(0, max(s["rss_mib"] for s in report["samples"]) * 1.15)
    right = left.twinx()
    right.plot(t, [s["images"] for s in report["samples"]], color="tab:blue", linestyle="--")
    right.set_ylabel("images audited", color="tab:blue")
    left.set_title(
        f"flaxcam audit of {report['count']:,} generated {report['size']}×{report['size']} images "
        f"({report['images_per_second']:.0f} images/s, {report['machine']['platform']})",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
