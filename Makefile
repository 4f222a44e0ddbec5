# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is pinned first, so no dependency pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test bench gpu-check lint clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

demo: $(VENV)/.demo
	$(PY) examples/demo.py

$(VENV)/.bench: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks.compare --all
	$(PY) -m benchmarks.compare --all --shape gqa
	$(PY) -m benchmarks.compare --levers
	$(PY) -m benchmarks.compare --objectives
	$(PY) -m benchmarks.online

# On a GPU machine (with a CUDA build of torch in .venv); says it skipped and exits 0 without CUDA.
gpu-check: $(VENV)/.bench
	$(PY) -m benchmarks.gpu_check

test: $(VENV)/.dev
	$(PY) -m ruff check lightning_align tests examples benchmarks
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs
