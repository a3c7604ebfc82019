# The two commands of the README: `make demo` (set up, then run the main job) and
# `make test` (set up, lint, then the default test suite). Nothing needs installing first
# but Python 3.11, pip and (for the data set) apt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-slow test-all lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/resnetlab models

lint: setup
	$(BIN)/ruff check src tests

test: lint
	$(BIN)/pytest -m "not slow"

test-slow: setup
	$(BIN)/pytest -m slow

test-all: lint
	$(BIN)/pytest
