"""Peak resident memory of ScoreCAM against its chunk size (one fresh process per chunk size).

    python -m benchmarks.probes.score_memory [--chunks 8 32 128] [--model resnet18] [--size 224]

ResNet-18 (random weights), one 224x224 image, ``layer4`` (512 channels → 512 masked forward passes).
Memory is the process's peak RSS (``ru_maxrss``), so each chunk size runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, time
import numpy as np
import flaxcam
from flaxcam import models
chunk, name, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model = models.create_model(name)
variables = models.init_variables(model, (1, size, size, 3))
images = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
flaxcam.explain(model, variables, images, method="scorecam", chunk_size=chunk).maps.block_until_ready()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"| {chunk} | {peak:.0f} | {peak - before:.0f} | {time.perf_counter() - start:.1f} |")
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--model", default="resnet18", help="a registered model (random weights)")
    parser.add_argument("--size", type=int, default=224, help="square image size")
    args = parser.parse_args(argv)
    print("| chunk size | peak RSS (MiB) | growth during explain (MiB) | seconds (incl. compile) |")
    print("|---|---|---|---|")
    for chunk in args.chunks:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(chunk), args.model, str(args.size)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(result.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
