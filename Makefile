# Set-up and checks. Two commands do everything on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# re-install only when the project's metadata changed
STAMP      := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint typecheck pytest bench services schema clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $@

demo: $(STAMP)
	$(BIN)/flowrun flows/demo.yaml

services:
	bash tests/install-services.sh

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(TEST_STAMP)
	$(BIN)/mypy --strict runner nodes

pytest: $(TEST_STAMP) services
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(TEST_STAMP)
	$(BIN)/python tests/bench/run.py

schema: $(STAMP)
	$(BIN)/flowrun schema -o flows/flow.schema.json

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
