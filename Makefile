# Quick start:  make demo   (explain photos with the pretrained default model)   |   make test   (the test suite)
# Both create or reuse .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flaxcam-installed
PYTEST_WORKERS ?= 2

.PHONY: demo demo-digits test test-fast bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,parity]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flaxcam.demo --out demo_out

demo-digits: $(STAMP)
	$(PY) -m flaxcam.demo --digits --out demo_out/digits

# FLAXCAM_REQUIRE_PARITY=1 turns a missing parity extra into a test error instead of a skip.
test: $(STAMP)
	FLAXCAM_REQUIRE_PARITY=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow and not parity" tests

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) demo_out build *.egg-info
