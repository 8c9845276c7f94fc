"""Settings shared by every test process.

**One XLA compilation cache for the whole run.** The suite runs in two pytest-xdist workers and starts
many subprocesses (the CLI, audits killed with kill -9, several ``jax.distributed`` processes); each of
them compiles the same models again. JAX's persistent compilation cache, in one folder for all of them,
lets a program compiled once be loaded by every other process. It changes no result — a cached
executable is the one XLA compiled for the same program, flags and versions — only the time.

The folder is ``$FLAXCAM_TEST_XLA_CACHE`` when set (CI may keep it between runs), else a fresh
temporary folder per run; ``FLAXCAM_TEST_XLA_CACHE=off`` turns the cache off. It is set through the
environment before JAX is imported, so subprocesses started by the tests inherit it.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile

import pytest


def _configure_compilation_cache() -> None:
    requested = os.environ.get("FLAXCAM_TEST_XLA_CACHE")
    if requested == "off":
        return
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # xdist workers inherit the controller's environment: the first process to get here chooses.
        folder = requested or tempfile.mkdtemp(prefix="flaxcam-test-xla-")
        if not requested:
            atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the run's own folder goes with it
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # Cache everything that took a measurable time to compile (JAX's default skips those under 1 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_OPTIMIZATIONS = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def _compile_for_test_speed() -> None:
    """Most of the suite's time is XLA compiling small programs that then run for milliseconds. With
    ``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` XLA skips its expensive LLVM passes: the programs compute the same
    operations (every tolerance is unchanged) and the suite takes about a fifth less time. Tests marked
    ``optimized`` (few programs run many times) compile with the full optimizations. Set the variable to 0
    to test everything as users run it; subprocesses inherit the choice through the environment."""
    os.environ.setdefault(_OPTIMIZATIONS, "1")


_configure_compilation_cache()
_compile_for_test_speed()


@pytest.fixture(autouse=True)
def _full_optimizations_when_marked(request, monkeypatch):
    """``@pytest.mark.optimized``: XLA's full optimizations for this test and the processes it starts."""
    if request.node.get_closest_marker("optimized") is None or os.environ.get(_OPTIMIZATIONS) == "0":
        yield
        return
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    monkeypatch.setenv(_OPTIMIZATIONS, "0")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's in-memory caches of traced and compiled programs and collect
    garbage, so that what a worker holds is bounded by one module, not by the hundreds it runs (a CI run
    once lost a worker mid-suite; its cause was not found). Programs needed again come back from the
    compilation cache above."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
