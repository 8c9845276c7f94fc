"""Subprocess entry of tests/test_distributed.py: one process of a multi-process run.

``python tests/distributed_script.py audit OUT COUNT PORT N I PAUSE``: audit COUNT generated images
(tests/audit_helpers.py, some unreadable) into OUT as process I of N (N=1: no coordinator), 8 rows per
part, sleeping PAUSE seconds after each batch of 8 and touching ``OUT.started-pI`` after the first.

``python tests/distributed_script.py explain OUT.npz PORT N I``: Grad-CAM of 8 fixed images under a global
mesh of every process's devices, each process feeding its slice of the batch; process 0 saves the
gathered maps, low-res maps, probabilities and targets in OUT.npz.
"""

import sys
import time
from pathlib import Path

from flaxcam import distributed


def explain_images():
    """8 images of the explain test (the same in every process and in the test itself)."""
    import numpy as np

    return np.random.default_rng(5).normal(size=(8, 32, 32, 3)).astype(np.float32)


def main() -> None:
    mode = sys.argv[1]
    if mode == "audit":
        out, count, port, n, i, pause = (
            Path(sys.argv[2]),
            int(sys.argv[3]),
            int(sys.argv[4]),
            int(sys.argv[5]),
            int(sys.argv[6]),
            float(sys.argv[7]),
        )
        if n > 1:
            distributed.initialize(f"127.0.0.1:{port}", n, i, timeout=60, heartbeat_timeout=10)
        from flaxcam import audit
        from tests import audit_helpers

        started = Path(f"{out}.started-p{i}")

        def on_batch(done: int) -> None:
            started.touch()
            time.sleep(pause)

        source = audit_helpers.make_source(count)
        model, variables = audit_helpers.make_model()
        result = audit.run(
            source,
            model,
            variables,
            out,
            preprocessing=audit_helpers.PREPROCESSING,
            batch_size=8,
            rows_per_part=8,
            progress=False,
            on_batch=on_batch,
        )
        print(f"done: processed {result.processed} in {result.seconds:.2f} s, complete {result.complete}", flush=True)
    elif mode == "explain":
        out, port, n, i = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        distributed.initialize(f"127.0.0.1:{port}", n, i, timeout=60, heartbeat_timeout=10)
        import jax
        import numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        import flaxcam
        from tests import audit_helpers

        images = explain_images()
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))  # every process's devices: a global mesh
        per_process = len(images) // n
        local = images[i * per_process : (i + 1) * per_process]  # this process feeds only its own slice
        global_images = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("batch")), local)
        model, variables = audit_helpers.make_model()
        explanation = flaxcam.explain(model, variables, global_images, method="gradcam", top_k=2, mesh=mesh)
        gathered = {
            name: multihost_utils.process_allgather(getattr(explanation, name), tiled=True)
            for name in ("maps", "low_res", "probabilities", "targets")
        }
        if i == 0:
            np.savez(out, devices=len(jax.devices()), local_devices=len(jax.local_devices()), **gathered)
        print("done", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
