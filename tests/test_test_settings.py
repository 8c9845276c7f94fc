"""The suite's compile settings (tests/conftest.py): tests compile without most of XLA's optimizations,
and tests marked ``optimized`` (and the processes they start) with all of them."""

from __future__ import annotations

import os

import jax
import pytest

VARIABLE = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def test_unmarked_tests_follow_the_variable_default_on():
    assert os.environ.get(VARIABLE) in ("0", "1")
    assert jax.config.read("jax_disable_most_optimizations") == (os.environ[VARIABLE] != "0")


@pytest.mark.optimized
def test_optimized_tests_and_their_subprocesses_compile_with_every_optimization():
    assert not jax.config.read("jax_disable_most_optimizations")
    assert os.environ[VARIABLE] == "0"  # inherited by the processes the test starts
