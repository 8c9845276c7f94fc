# Quick start:  make demo   (explain photos with the pretrained default model, figures + a method grid)   |   make test   (the test suite but its few slow cases: make test-slow)
# Every target creates or reuses .venv and installs only the extras it needs (one stamp per extra set,
# redone when pyproject.toml changes): demo -> .[demo], lint -> .[dev], docs -> .[docs],
# test/bench -> everything the tests import.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# Three pytest workers on this project's 2-core machine (part of the suite waits on subprocesses, pip and
# Chromium): the whole suite took 1025 s with 3 workers, against 1260 s with 2 before the `optimized` tests
# were marked (one run each; the two changes were measured together).
PYTEST_WORKERS ?= 3

EXTRAS_demo := demo
EXTRAS_test := dev,audit,tfds,train,demo,parity
EXTRAS_lint := dev
EXTRAS_docs := docs
EXTRAS_all := all
LINT_PATHS := flaxcam benchmarks experiments tests tools

.PHONY: demo demo-digits test test-slow test-all test-fast bench install lint lint-fix docs docs-serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# .venv/.installed-<set>: flaxcam installed (editable) with the extras of EXTRAS_<set>.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS_$*)]'
	touch $@

install: $(VENV)/.installed-all

demo: $(VENV)/.installed-demo
	$(PY) -m flaxcam.demo --out demo_out

demo-digits: $(VENV)/.installed-demo
	$(PY) -m flaxcam.demo --digits --out demo_out/digits

# FLAXCAM_REQUIRE_PARITY=1 turns a missing parity extra into a test error instead of a skip.
# `make test`: every test but the few marked slow (@pytest.mark.slow: end-to-end experiments, subprocess
# fault injection, install checks), parity tests included; `make test-slow` runs those; CI runs both.
test: $(VENV)/.installed-test
	FLAXCAM_REQUIRE_PARITY=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 -m "not slow" tests

test-slow: $(VENV)/.installed-test
	FLAXCAM_REQUIRE_PARITY=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 -m slow tests

test-all: test test-slow

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow and not parity" tests

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks

# The gates: ruff (lint + format check) and mypy, configured in pyproject.toml.
lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# Applies ruff's automatic fixes and formatting in place (what remains needs a person: `make lint`).
lint-fix: $(VENV)/.installed-lint
	RUFF=$(VENV)/bin/ruff tools/lint-fix.sh $(LINT_PATHS)

# The documentation site (docs/ + mkdocs.yml) into site/; --strict fails on a broken link or reference.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) demo_out build dist site *.egg-info .mypy_cache .ruff_cache
