# `make demo` and `make test` each set up their own virtual environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/moedistill: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel this kind of machine has on disk; GPU users install their own.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/moedistill

demo: setup
	$(BIN)/moedistill run --overwrite  # a second `make demo` reruns the students; checkpoint-0 and the caches are reused

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_loss.py

clean:
	rm -rf outputs build dist src/*.egg-info
