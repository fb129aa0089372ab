# Quick start: `make demo` (set up, run the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEVICES ?= 8
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=$(DEVICES) JAX_PLATFORMS=cpu

.PHONY: setup setup-dev demo test bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

demo: setup
	$(PY) -m rlhf_jax.main --config configs/demo.yaml

test: setup-dev
	$(TEST_ENV) $(PY) -m pytest -q tests

bench: setup-dev
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) runs
