# Two commands for a fresh machine: `make run` (install + default pipeline) and
# `make test` (install with test extras + the whole test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.PHONY: install install-dev system-deps run lint test bench
install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

run: install
	$(BIN)/metadistill run

# The browser test drives Debian's Chromium; install it when missing (needs root).
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	  else echo "install chromium and chromium-driver (Debian packages) for the browser test" >&2; exit 1; fi; fi

# Lint and the import contracts (pyproject.toml: [tool.ruff], [tool.importlinter]).
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint system-deps
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python -m benchmarks.pipeline_overhead --json results/pipeline_overhead.json
