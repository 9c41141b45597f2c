# On a fresh machine: `make bench` runs the main job (cnnkernels-bench: per-architecture
# throughput and memory against torchvision eager and torch.compile), `make test` the tests;
# `make bench-ops` runs the per-op pytest-benchmark suite.
# Both create .venv, install the dependencies and build the package first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: all venv install test bench bench-ops gpu-check mutation clean

all: test

$(VENV)/.deps-installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps-installed

install: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m cnnkernels.info

test: install
	CNNKERNELS_REQUIRE_EXTENSION=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/cnnkernels-bench --output bench-results $(BENCH_ARGS)

bench-ops: install
	$(PY) -m pytest benches/bench_ops.py --benchmark-only --benchmark-group-by=group \
	  --benchmark-columns=median,iqr,min,rounds $(PYTEST_ARGS)

# On the lent GPU machine (no venv there: its python3 has torch, triton, pytest):
#   make gpu-check            builds for sm_90 and runs benches/gpu_check.py, results under $(OUT)
#   make gpu-check DRY_RUN=1  the same script's CPU stand-ins at tiny shapes (run by make test)
#   GPU_CHECK_ARGS="--only build,op-speed,models" gives the time of the stages left out to the others
OUT ?= gpu-check-out
DRY_RUN ?=
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benches/gpu_check.py --out "$(OUT)" $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

# Planted faults (issue 14's test strength): both tools write mutants into the sources, so they
# run in a scratch clone of HEAD, built in place; hours on 2 cores. MUTATE: words choosing
# mutants / files (empty: all).
MUTATION_DIR ?= /tmp/cnnkernels-mutation
MUTATE ?=
mutation: venv
	$(PY) -m pip install -q -r requirements-mutation.txt
	rm -rf "$(MUTATION_DIR)" && git clone -q . "$(MUTATION_DIR)"
	cd "$(MUTATION_DIR)" && $(abspath $(PY)) setup.py -q build_ext --inplace && \
	  { $(abspath $(PY)) tests/mutation.py $(MUTATE); $(abspath $(PY)) tests/mutmut_run.py $(MUTATE); }

clean:
	rm -rf build *.egg-info cnnkernels/_C*.so .pytest_cache .benchmarks .mutmut-cache mutmut-survivors.txt
