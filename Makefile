# The two commands of the README. Both work on a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint schemas clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## make run: set up and run the example workflow on the embedded NATS server
run: $(STAMP)
	$(BIN)/jetreduce run examples/wordcount.yml

## make test: set up, lint, type-check and run the whole test suite (what CI runs)
test: $(STAMP)
	$(BIN)/ruff check services tests loadtest
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check services tests loadtest
	$(BIN)/ruff format --check services
	$(BIN)/mypy

## make schemas: regenerate schemas/ from the msgspec types
schemas: $(STAMP)
	$(BIN)/python -m jetreduce.contract.schemas schemas

clean:
	rm -rf $(VENV) .jetreduce
