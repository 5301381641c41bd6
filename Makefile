# Helios Serve: `make run` serves the default configuration, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install run test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/helios-serve

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

format: $(STAMP)
	$(VENV)/bin/ruff check --fix app tests
	$(VENV)/bin/ruff format app tests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
