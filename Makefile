# Two entry points: `make train` and `make test`. Each creates .venv on first use.
# `make test` runs one pytest worker per core (pytest-xdist; each test process uses one thread).
VENV := .venv
PYTHON ?= python3
ARGS ?=

.PHONY: train test lint

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/cifarlab train --preset seed $(ARGS)

test: $(VENV)/.installed
	.ci/postgres
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m pytest -q -n auto --dist worksteal

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
