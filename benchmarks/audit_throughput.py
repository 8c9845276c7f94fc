"""Audit end to end against bare ``explain``: same model, method, batch and images, interleaved rounds.

    python -m benchmarks.audit_throughput [--configs small resnet18] [--batches 8] [--rounds 3]
                                          [--out benchmarks/results/audit_throughput_cpu.jsonl]

* **bare explain**: the images already preprocessed in memory; per batch ``flaxcam.explain(...)`` and
  ``block_until_ready`` on the maps (what a user's own loop does);
* **explain + summary**: the same loop plus the audit's on-device summary of each batch
  (:func:`flaxcam.audit.stats.summarize`: top-k, 20%-rule boxes, attention statistics, float16 maps)
  and its transfer to the host — the audit's device work without reading or writing;
* **audit**: ``flaxcam.audit.run`` over a :class:`benchmarks.audit_memory.GeneratedSource` of the same
  images: reading and preprocessing them (grain), explain, statistics and boxes on device, host transfer,
  Parquet parts, manifest — the wall time of the whole call.

Both are warmed up first (compilation excluded from both), then timed alternately ``--rounds`` times; the
median round gives images/s and the ratio audit / bare. Random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    # name: (model factory name, image size, batch, layer)
    "small": ("small_cnn", 64, 64, None),
    "resnet18": ("resnet18", 224, 32, "layer4"),
}


def _model(name: str, size: int):
    import jax
    import jax.numpy as jnp

    from flaxcam import models
    from flaxcam.models.small import small_cnn

    if name == "small_cnn":
        small = small_cnn(10, (16, 32, 64))
        return small, small.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    model = models.create_model(name)
    return model, models.init_variables(model, (1, size, size, 3))


def benchmark(config: str, batches: int, rounds: int, method: str = "cam") -> dict:
    import jax

    import flaxcam
    from benchmarks.audit_memory import GeneratedSource
    from flaxcam import audit
    from flaxcam.imageio import Preprocessing

    model_name, size, batch, layer = CONFIGS[config]
    model, variables = _model(model_name, size)
    count = batches * batch
    source = GeneratedSource(count, size)
    preprocessing = Preprocessing((size, size))
    inputs = np.stack([preprocessing.normalize(source[i].image.astype(np.float32) / 255) for i in range(count)])
    work = Path(tempfile.mkdtemp(prefix="flaxcam-audit-bench-"))

    def bare() -> float:
        start = time.perf_counter()
        for b in range(batches):
            explanation = flaxcam.explain(
                model, variables, inputs[b * batch : (b + 1) * batch], method=method, layer=layer
            )
            jax.block_until_ready(explanation.maps)
        return time.perf_counter() - start

    from flaxcam.audit import stats as stats_lib

    no_boxes = np.full((batch, 4), np.nan, np.float32)

    def summarized() -> float:
        start = time.perf_counter()
        for b in range(batches):
            e = flaxcam.explain(model, variables, inputs[b * batch : (b + 1) * batch], method=method, layer=layer)
            summary = stats_lib.summarize(
                e.maps[:, 0],
                e.low_res[:, 0],
                e.probabilities,
                e.targets[:, 0],
                no_boxes,
                None,
                0.2,
                top_k=3,
                border=0.1,
                corner=0.2,
                with_masks=False,
                box_resolution=64,
            )
            jax.device_get(summary)
        return time.perf_counter() - start

    def audited(run: int) -> float:
        start = time.perf_counter()
        result = audit.run(
            source,
            model,
            variables,
            work / f"run{run}",
            preprocessing=preprocessing,
            method=method,
            layer=layer,
            batch_size=batch,
            progress=False,
        )
        seconds = time.perf_counter() - start
        assert result.complete and result.rows == count, result
        return seconds

    try:
        bare()  # warm-up: compile
        summarized()
        audited(-1)
        times: dict[str, list[float]] = {"bare": [], "summary": [], "audit": []}
        for r in range(rounds):
            times["bare"].append(bare())
            times["summary"].append(summarized())
            times["audit"].append(audited(r))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare_rate = count / statistics.median(times["bare"])
    audit_rate = count / statistics.median(times["audit"])
    summary_rate = count / statistics.median(times["summary"])
    return {
        "benchmark": "audit_throughput",
        "config": config,
        "model": model_name,
        "method": method,
        "layer": layer,
        "size": size,
        "batch": batch,
        "images": count,
        "rounds": rounds,
        "bare_images_per_second": round(bare_rate, 1),
        "explain_summary_images_per_second": round(summary_rate, 1),
        "audit_images_per_second": round(audit_rate, 1),
        "ratio": round(audit_rate / bare_rate, 3),
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
    }


def main() -> None:
    from benchmarks.throughput import machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="cam")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    machine = machine_info()
    records = []
    for config in args.configs:
        record = {**benchmark(config, args.batches, args.rounds, args.method), "machine": machine}
        records.append(record)
        print(json.dumps(record))
    print(
        "\n| model | method | size | batch | images | bare explain img/s | explain + summary img/s | audit img/s | ratio |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in records:
        print(
            f"| {r['model']} | {r['method']} | {r['size']}x{r['size']} | {r['batch']} | {r['images']} | "
            f"{r['bare_images_per_second']} | {r['explain_summary_images_per_second']} | {r['audit_images_per_second']} | {r['ratio']} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
