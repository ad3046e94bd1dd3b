# Two entry points, both self-contained on a fresh machine (venv, deps, extension build):
#   make run    the main job: a many-label set (generated, no download), then the loss alone at large L
#   make test   the test suite (what CI runs)
# Both are quick the second time: each step reruns only when its inputs changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CSRC   := $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh csrc/*.h)

.PHONY: run test test-all bench bench-quick build clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps pyproject.toml setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# ninja keeps object files under build/, so a rebuild compiles only what changed.
$(VENV)/.built: $(VENV)/.installed $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(VENV)/.built

run: build
	$(PY) -m mlcl_fast.cli run

test: build
	$(PY) -m pytest -q tests

test-all: build
	$(PY) -m pytest -q -m "" tests

bench: build
	$(PY) -m pytest -q bench --benchmark-only

bench-quick: build
	$(PY) -m bench.sweep --quick --device cpu

clean:
	rm -rf build $(VENV) mlcl_fast/_C*.so *.egg-info
