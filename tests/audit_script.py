"""Subprocess entry of the audit tests: ``python tests/audit_script.py MODE OUT COUNT``.

* ``run``: audit COUNT generated images into OUT, slowly (a pause per batch) so a test can kill it.
* ``hold`` (with a 4th argument PARTS): batches of 32, 64 rows per part; once PARTS parts are written,
  create ``OUT.held`` and wait (before the next batch) until ``OUT.release`` exists: the fault-injection
  tests kill it there or start a second audit.
* ``devices``: audit COUNT images on all (emulated) devices into OUT.
* ``distributed`` (with PORT NUM_PROCESSES PROCESS_ID): one process of a multi-process audit
  (``jax.distributed`` with its coordinator on 127.0.0.1:PORT).
"""

import sys
import time
from pathlib import Path
from typing import Any

import jax

mode, out, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if mode == "distributed":
    port, num_processes, process_id = sys.argv[4:7]
    jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id), initialization_timeout=60)

from flaxcam import audit
from tests import audit_helpers

source = audit_helpers.make_source(count)
model, variables = audit_helpers.make_model()
common: dict[str, Any] = {"preprocessing": audit_helpers.PREPROCESSING, "batch_size": 64, "progress": False}
if mode == "run":
    audit.run(source, model, variables, out, rows_per_part=64, on_batch=lambda done: time.sleep(0.05), **common)
elif mode == "hold":
    from flaxcam.audit import store

    parts, held, release = int(sys.argv[4]), Path(f"{out}.held"), Path(f"{out}.release")

    def hold(done: int) -> None:
        if len(store.part_files(out, "part")) >= parts and not release.exists():
            held.touch()
            while not release.exists():
                time.sleep(0.05)

    common["batch_size"] = 32
    audit.run(source, model, variables, out, rows_per_part=64, on_batch=hold, **common)
elif mode == "devices":
    assert len(jax.local_devices()) == 4, jax.local_devices()
    audit.run(source, model, variables, out, rows_per_part=100, **common)
elif mode == "distributed":
    audit.run(source, model, variables, out, rows_per_part=64, **common)
else:
    raise SystemExit(f"unknown mode {mode}")
