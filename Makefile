# Two commands for a fresh machine: `make run` (install + default pipeline) and
# `make test` (install with test extras + the whole test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.PHONY: install install-dev system-deps run lint docs test test-fast bench
install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

run: install
	$(BIN)/metadistill run

# The browser test drives Debian's Chromium; the serving benchmark's smoke loads the server
# with wrk. Install them when missing (needs root).
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v wrk >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver wrk >/dev/null; \
	  else echo "install chromium, chromium-driver and wrk (Debian packages) for the browser test and the serving benchmark" >&2; exit 1; fi; fi

# Lint and the import contracts (pyproject.toml: [tool.ruff], [tool.importlinter]).
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml); strict: a broken link or anchor, or a page left out
# of nav, fails it. The configuration reference page is generated from the schema.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Two pytest workers, a test file each at a time (module fixtures, such as the team's servers,
# start once per file): much of the suite waits on servers and subprocess start-up, which
# leaves a core idle when the tests run one by one.  Each worker and what it starts keep to
# CPUs of their own (tests/conftest.py).  On the 2-core reference machine, once installed:
# 17 min 52 s for lint, docs and tests (pytest 17:47); .ci/run from a fresh clone, install
# included, 20 min 30 s (pytest 18:27).  Unpinned, the workers' torch threads fought and the
# tests took 24 min; one by one, about 29.
PYTEST_WORKERS ?= 2
test: lint system-deps docs
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The fast loop: everything but the files that start servers, torchrun or a browser.
test-fast: install-dev
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --ignore=tests/test_team.py --ignore=tests/test_team_faults.py \
	  --ignore=tests/test_distributed.py --ignore=tests/test_schedule.py --ignore=tests/test_ui_browser.py \
	  --ignore=tests/test_sources.py --ignore=tests/test_serving.py

bench: install-dev
	$(BIN)/python -m benchmarks.pipeline_overhead --json results/pipeline_overhead.json
