"""Bytes per audit row and Parquet rows/s for 450x600 images (ResNet-18, ``layer4``: 15x19 low-res maps).

    python -m benchmarks.parquet_write [--rows 4096]

Audits 16 generated 450x600 images (random weights) to get the audit's real schema, then writes a part
of ``--rows`` distinct rows (random float16 maps: the incompressible worst case; real maps are smoother)
three times with the audit's settings (``zstd``) and prints the best rows/s and the bytes per row on
disk, one JSON line. The inputs of the pod-scale plan's output column (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


class _Large:
    """16 images of 450x600 made from the 64x64 generated ones (nearest upscaling)."""

    def __init__(self, count: int = 16) -> None:
        from benchmarks.audit_memory import GeneratedSource

        self.source = GeneratedSource(count, 64)
        self.class_names = self.source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        from flaxcam.data import Record

        record = self.source[index]
        image = np.kron(record.image, np.ones((8, 10, 1), np.uint8))[:450, :600]
        image = np.pad(image, ((0, 450 - image.shape[0]), (0, 600 - image.shape[1]), (0, 0)))
        return Record(index=record.index, id=record.id, image=image, label=record.label)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.audit_throughput import _model
    from flaxcam import audit
    from flaxcam.audit import store
    from flaxcam.imageio import Preprocessing

    model, variables = _model("resnet18", 64)
    out = Path(tempfile.mkdtemp(prefix="flaxcam-parquet-"))
    audit.run(_Large(), model, variables, out / "audit", preprocessing=Preprocessing((450, 600)), batch_size=8,
              layer="layer4", progress=False)  # fmt: skip
    sample = pa.concat_tables([pq.read_table(p) for p in store.part_files(out / "audit", "part")])
    cells = int(np.prod(store.read_manifest(out / "audit")["low_res_shape"]))
    rng, n = np.random.default_rng(0), args.rows
    columns = {}
    for name in sample.column_names:
        kind = sample.column(name).type
        if name == "low_res":
            maps = rng.random((n, cells)).astype(np.float16)
            columns[name] = pa.array([m.tobytes() for m in maps], type=kind)
        elif name == "index":
            columns[name] = pa.array(np.arange(n, dtype=np.int64))
        elif name == "id":
            columns[name] = pa.array([f"HAM10000_images_part_1/ISIC_{i:07d}.jpg" for i in range(n)])
        elif pa.types.is_floating(kind):
            columns[name] = pa.array(rng.random(n).astype(kind.to_pandas_dtype()))
        else:
            columns[name] = pa.concat_arrays([sample.column(name).combine_chunks()] * (-(-n // len(sample))))[:n]
    table, path = pa.table(columns), out / "part.parquet"
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        pq.write_table(table, path, compression="zstd")
        seconds.append(time.perf_counter() - start)
    result = {
        "rows": n,
        "low_res_cells": cells,
        "rows_per_second": round(n / min(seconds), 1),
        "bytes_per_row": round(path.stat().st_size / n, 1),
        "seconds": [round(s, 4) for s in seconds],
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
