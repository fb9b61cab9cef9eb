# `make demo` and `make test` work from a fresh clone with nothing but Python 3 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser databases demo test test-slow clean

$(BIN)/sdpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
# the CPU build of torch first, so the open `torch>=2.4` range installs nothing more
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
# SDMetrics (the table evaluation's quality and DCR reports, optional) declares pandas<3 but runs on pandas 3
# (tests/test_tabular_evaluate.py): installed without its pins, with the three packages it needs
	$(BIN)/pip install -q --no-deps sdmetrics==0.32.0 copulas==0.14.1 plotly==7.1.0 narwhals==2.29.0
	touch $@

setup: $(BIN)/sdpipe

# Debian's headless chromium + chromedriver for the web page test (tests/test_serve_live.py); installed with
# apt when missing and we are root, else that one test skips, saying why
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "note: no chromium/chromedriver; the web page test will be skipped"; }

# The registry's database-server tests (tests/test_registry_servers.py) run against this machine's PostgreSQL
# and MariaDB/MySQL: as root, a throwaway role sdpipe_test is made on each server that answers (idempotent);
# where none answers, or the variable is set empty, those tests skip, saying why
export SDPIPE_TEST_POSTGRES_URL ?= postgresql+psycopg://sdpipe_test:sdpipe_test@127.0.0.1:5432/postgres
export SDPIPE_TEST_MYSQL_URL ?= mysql+pymysql://sdpipe_test:sdpipe_test@127.0.0.1:3306
PG_ROLE := CREATE ROLE sdpipe_test LOGIN CREATEDB PASSWORD 'sdpipe_test'
MY_USER := CREATE USER IF NOT EXISTS 'sdpipe_test'@'127.0.0.1' IDENTIFIED BY 'sdpipe_test'; \
	GRANT ALL PRIVILEGES ON \`sdpipe\\_test\\_%\`.* TO 'sdpipe_test'@'127.0.0.1'

databases:
	@[ "$$(id -u)" = 0 ] || exit 0; cd /; \
	if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1; then \
	  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'sdpipe_test'\"" | grep -q 1 || \
	  su postgres -c "psql -qc \"$(PG_ROLE)\"" || echo "note: no PostgreSQL role for the tests"; fi; \
	if command -v mariadb >/dev/null && mariadb -uroot -e "SELECT 1" >/dev/null 2>&1; then \
	  mariadb -uroot -e "$(MY_USER)" || echo "note: no MariaDB user for the tests"; fi

demo: setup
	$(BIN)/sdpipe demo --out runs/demo --overwrite

test: setup browser databases
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/sdpipe
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow -s

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
