# Two commands for a fresh machine: `make demo` and `make test`. See README.md, "Installing".
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
# constraints.txt pins the exact versions this repository is tested with: resolving the full stack
# without it can backtrack for many minutes (aiobotocore pins botocore to a narrow range).
INSTALL := $(PIP) install --constraint constraints.txt

.PHONY: install install-test demo test lint clean
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cliploop needs Python >= 3.11 (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(INSTALL) --editable .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(INSTALL) --editable '.[test]'
	@touch $@

demo: install
	$(VENV)/bin/cliploop demo

# Lint and format check first (ruff, configured in pyproject.toml), then the whole suite.
test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest

# Fix what ruff can fix and format the tree (the same rules `make test` checks).
lint: install-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .cliploop .pytest_cache
