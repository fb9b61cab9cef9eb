# `make demo` and `make test` work from a fresh clone with nothing but Python 3 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow clean

$(BIN)/sdpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
# the CPU build of torch first, so the open `torch>=2.4` range installs nothing more
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/sdpipe

demo: setup
	$(BIN)/sdpipe demo --out runs/demo

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src/sdpipe
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow -s

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
