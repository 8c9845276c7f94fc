"""Starting a multi-process (multi-controller) JAX run: one function the command line calls before any
JAX computation.

JAX runs one process per host (TPU pod, GPU cluster) or several on one machine (CPU devices, a
coordinator on ``127.0.0.1``); :func:`jax.distributed.initialize` connects them through a coordinator
service run by process 0. After it, ``jax.process_index()`` / ``jax.process_count()`` tell each process
its share of the work and ``jax.devices()`` lists every process's devices (a global mesh).

Tested: explicit ``coordinator`` / ``num_processes`` / ``process_id`` with several processes on one
machine (``tests/test_distributed.py``). Untested here: ``coordinator="auto"``, JAX's cluster auto-detection on
Cloud TPU pods, SLURM (``srun``) and Open MPI, where all three arguments are read from the environment.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from typing import Any

__all__ = ["DistributedSetupError", "allgather_json", "barrier", "differing_processes", "initialize", "parse_address"]

DEFAULT_TIMEOUT_S = 60
"""Seconds to wait for every process to reach the coordinator before giving up."""

DEFAULT_HEARTBEAT_TIMEOUT_S = 100
"""Seconds without a heartbeat after which a process counts as dead (JAX's default). A process killed
mid-run (``kill -9``, a lost host) makes every other process abort within about this time, whether it
waits in a collective or a barrier or not, with ``Task N heartbeat timeout`` in its log; the parts
already written stay, and rerunning the same commands completes the audit."""


class DistributedSetupError(ValueError):
    """The processes of a multi-process run could not be connected (bad arguments, unreachable or
    missing coordinator, a process that never arrived)."""


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(HOST, PORT)``, or :class:`DistributedSetupError` naming the expected form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(f"--coordinator must be HOST:PORT (e.g. 127.0.0.1:12355), got {address!r}")
    return host, int(port)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = DEFAULT_TIMEOUT_S,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    auto: bool = False,
) -> bool:
    """Connect this process to the others of a multi-process run; returns whether it did.

    * All of ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id`` given:
      :func:`jax.distributed.initialize` with them. A process other than 0 first waits up to
      ``timeout`` seconds for the coordinator to accept connections, else :class:`DistributedSetupError`
      (process 0 not started, a wrong address). Then JAX waits up to ``timeout`` seconds for all
      ``num_processes`` to register; past that JAX itself aborts the process (``DEADLINE_EXCEEDED``,
      not catchable in Python; a line on stderr says so beforehand).
    * ``coordinator="auto"`` (or none given and ``auto``): :func:`jax.distributed.initialize` with
      JAX's cluster auto-detection (Cloud TPU pods, SLURM, Open MPI; untested here).
    * None given otherwise, or ``num_processes == 1``: a single process, nothing to do (False).

    ``heartbeat_timeout``: see :data:`DEFAULT_HEARTBEAT_TIMEOUT_S`.

    Must run before any JAX computation (JAX refuses afterwards). Arguments are checked first, so a bad
    ``process_id`` fails at once instead of after ``timeout``.
    """
    if coordinator == "auto":
        if num_processes is not None or process_id is not None:
            raise DistributedSetupError(
                "--coordinator auto reads the process count and id from the cluster: "
                "leave out --num-processes and --process-id"
            )
        coordinator, auto = None, True
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not any(given):
        if not auto:
            return False
        return _call(timeout=timeout, heartbeat_timeout_seconds=heartbeat_timeout)
    if not all(given):
        raise DistributedSetupError(
            "a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and --process-id I "
            f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r})"
        )
    assert coordinator is not None and num_processes is not None and process_id is not None
    if num_processes < 1:
        raise DistributedSetupError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedSetupError(
            f"--process-id must be in 0..{num_processes - 1} (--num-processes {num_processes}), got {process_id}"
        )
    if timeout < 1 or heartbeat_timeout < 1:
        raise DistributedSetupError(
            f"timeouts must be >= 1 s, got timeout={timeout}, heartbeat_timeout={heartbeat_timeout}"
        )
    host, port = parse_address(coordinator)
    if num_processes == 1:
        return False
    if process_id != 0:
        _wait_for_coordinator(host, port, timeout)
    _say(
        f"process {process_id} of {num_processes}: joining the run at {host}:{port} (waiting up to {timeout} s "
        "for every process; past that JAX aborts the process with DEADLINE_EXCEEDED)"
    )
    return _call(
        coordinator_address=f"{host}:{port}",
        num_processes=num_processes,
        process_id=process_id,
        timeout=timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )


def _say(message: str) -> None:
    print(f"flaxcam: {message}", file=sys.stderr, flush=True)


def _wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Return once ``host:port`` accepts TCP connections; :class:`DistributedSetupError` after ``timeout``
    seconds. (JAX itself aborts the whole process, uncatchable, when it cannot register in time; this
    check turns the common case, process 0 not started or the wrong address, into a clear error.)"""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as error:
            last_error = error
            time.sleep(0.2)
    raise DistributedSetupError(
        f"the coordinator {host}:{port} was not reachable within {timeout} s ({last_error}): start process 0 "
        "(--process-id 0) with the same --coordinator, which must be its address and a free port"
    )


def _call(*, timeout: int, **arguments) -> bool:
    import jax

    try:
        jax.distributed.initialize(**arguments, initialization_timeout=int(timeout))
    except Exception as error:  # XlaRuntimeError / RuntimeError / ValueError, depending on the JAX version
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = arguments.get("coordinator_address", "the auto-detected coordinator")
        who = (
            f"process {arguments['process_id']} of {arguments['num_processes']}"
            if "process_id" in arguments
            else "this process"
        )
        raise DistributedSetupError(
            f"{who} could not join the run at {where} within {timeout} s: {first_line[:300]} "
            "(is process 0 running with the same --coordinator and --num-processes, and every process id "
            "0..N-1 started once?)"
        ) from None
    return True


# ------------------------------------------------------------------------------------ after initialize()


def barrier(name: str) -> None:
    """Wait until every process of the run has reached the barrier ``name`` (nothing with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def differing_processes(settings: Any) -> list[int]:
    """The ids of the processes whose ``settings`` (anything JSON can write, keys sorted) differ from
    process 0's; every process gets the same list (an all-gather of an 8-byte SHA-256 prefix). Empty
    with one process."""
    import jax

    count = jax.process_count()
    if count < 2:
        return []
    import numpy as np
    from jax.experimental import multihost_utils

    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(count, -1)
    return [i for i in range(count) if not np.array_equal(digests[i], digests[0])]


def allgather_json(value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-ready), in process order, in every process: ``[value]`` with one
    process. Two all-gathers: the encoded lengths, then the bytes padded to the longest."""
    import jax

    count = jax.process_count()
    if count < 2:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(count)
    padded = np.zeros(max(1, int(lengths.max())), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(count, -1)
    return [json.loads(bytes(gathered[i, : lengths[i]]).decode()) for i in range(count)]
