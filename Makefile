# `make demo` and `make test` work from a fresh clone with nothing but Python 3 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo test test-slow clean

$(BIN)/sdpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
# the CPU build of torch first, so the open `torch>=2.4` range installs nothing more
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/sdpipe

# Debian's headless chromium + chromedriver for the web page test (tests/test_serve_live.py); installed with
# apt when missing and we are root, else that one test skips, saying why
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "note: no chromium/chromedriver; the web page test will be skipped"; }

demo: setup
	$(BIN)/sdpipe demo --out runs/demo

test: setup browser
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/sdpipe
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow -s

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
