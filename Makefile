# Quick start: `make demo` (set up, run the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEVICES ?= 8
# Tests keep Python's bytecode (and pytest's rewritten test modules) even where the environment turns it off:
# every test worker and every CLI run a test starts would otherwise compile the same sources again.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=$(DEVICES) JAX_PLATFORMS=cpu PYTHONDONTWRITEBYTECODE=
# On CPU, XLA maps its scratch memory anew for every step through glibc; keeping freed memory in the process
# removes that cost (see docs/performance.md). `python -m rlhf_jax.main` sets this itself; the benchmarks compare.
CPU_MALLOC := MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=8589934592

.PHONY: setup setup-dev demo test test-all bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt tests/install_browser.sh
	$(PY) -m pip install -q -r requirements-dev.txt
	bash tests/install_browser.sh
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

demo: setup
	$(PY) -m rlhf_jax.main --config configs/demo.yaml

# The fast tier: every stage end to end once and every numerical oracle. The full tier adds the slow ones
# (multi-process runs, kills and resumes, every mesh shape, the reference configs' compiles); CI runs it.
# Tests mostly wait on XLA's single-threaded compiler, so they run in one worker per core; idle workers take queued
# tests from busy ones (worksteal), so that no worker waits alone on the last slow tests.
PYTEST := $(TEST_ENV) $(PY) -m pytest -q -n auto --dist worksteal

test: setup-dev
	$(PYTEST) -m "not full" tests

test-all: setup-dev
	$(PYTEST) tests

bench: setup-dev
	$(CPU_MALLOC) $(PY) benchmarks/decode.py --out benchmarks/results/decode_cpu_tiny_fp32.json
	$(CPU_MALLOC) $(PY) benchmarks/small_matmuls.py --out benchmarks/results/small_matmuls_cpu.json
	$(CPU_MALLOC) $(PY) benchmarks/train.py --out benchmarks/results/train_cpu_malloc_tuned.json
	$(PY) benchmarks/train.py --out benchmarks/results/train_cpu.json
	$(PY) benchmarks/prepare.py --out benchmarks/results/prepare_cpu.json

clean:
	rm -rf $(VENV) runs
