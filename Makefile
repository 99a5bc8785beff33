# Quick start:  make demo   (set up + sample a grid with the default model)
#               make test   (set up + run the test suite)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/hmar sample --out demo_out

# the suite in PYTEST_WORKERS pytest-xdist processes (tests/conftest.py gives each its share of the cores;
# `make test PYTEST_WORKERS=0` runs it in one process); --dist loadgroup keeps the tests marked
# xdist_group(NAME) on one worker, one after the other (the torchrun launches)
PYTEST_WORKERS ?= 2
# the browser test drives a server and Chromium: it runs in a pytest process of its own, so that no state
# left by other tests (threads, Pillow limits, caches) can slow it past its timeouts
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --ignore=tests/test_webdemo.py
	$(BIN)/python -m pytest -q tests/test_webdemo.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
