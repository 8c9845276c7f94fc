"""Each probe in benchmarks/probes/ still runs (tiny sizes, one round; output not checked: the probes
print tables for a reader, see benchmarks/README.md). Speed is never asserted."""

from __future__ import annotations

import importlib

import pytest

PROBES = {
    "conv3x3": ["--batch", "1", "--rounds", "1"],
    "pointwise_conv": ["--batch", "1", "--rounds", "1"],
    "page_faults": ["--model", "resnet18", "--batch", "1", "--calls", "1"],
    "score_memory": ["--chunks", "8", "--model", "small_cnn", "--size", "32"],
    "nnx_overhead": ["--model", "resnet18", "--size", "32", "--calls", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_runs(name, capsys):
    importlib.import_module(f"benchmarks.probes.{name}").main(PROBES[name])
    assert "|---" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["depthwise_conv", "xla_small_conv"])
def test_probe_without_options_runs(name, capsys):
    importlib.import_module(f"benchmarks.probes.{name}").main(batch=1)
    assert "|---" in capsys.readouterr().out
