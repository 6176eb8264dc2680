# hyperbroker: every target sets itself up from the project's own files.
#   make demo   create the virtualenv, install, run the demo
#   make test   the same set-up and the servers the tests run (redis-server, HAProxy,
#               promtool: scripts/system_deps.sh), then lint, type-check and the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml tools/pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv system-deps demo test lint typecheck unit proto proto-check bench clean

$(STAMP): pyproject.toml tools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./tools
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	bash scripts/system_deps.sh

demo: venv
	$(BIN)/hyperbroker demo --duration 10

test: venv system-deps lint typecheck
	$(BIN)/pytest -q

unit: venv
	$(BIN)/pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

proto: venv
	$(BIN)/python scripts/gen_proto.py

proto-check: venv
	$(BIN)/python scripts/gen_proto.py --check

bench: venv
	$(BIN)/hyperbroker bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
