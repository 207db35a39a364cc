# Two commands for a fresh machine: `make demo` and `make test`. See docs/install.md, "Installing".
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
# constraints.txt pins the exact versions this repository is tested with: resolving the full stack
# without it can backtrack for many minutes (aiobotocore pins botocore to a narrow range).
# Quiet: pip says only its warnings and errors; each step announces itself in one line.
INSTALL := $(PIP) install --quiet --disable-pip-version-check --constraint constraints.txt

.PHONY: install install-test demo test check lint clean
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cliploop needs Python >= 3.11 (set PYTHON=...)"'
	@echo "cliploop: making the virtual environment $(VENV)/"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --disable-pip-version-check --upgrade pip

# The `stack` extra: `cliploop stack up` runs moto's S3-compatible server as the local object store.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	@echo "cliploop: installing cliploop and its pinned dependencies into $(VENV)/ (a few minutes the first time)"
	@$(INSTALL) --editable '.[stack]'
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "cliploop: installing the test tools (pytest, ruff)"
	@$(INSTALL) --editable '.[stack,test]'
	@touch $@

demo: install
	@$(VENV)/bin/cliploop demo

# Lint and format check first (ruff, configured in pyproject.toml), then the whole suite in two processes
# (pytest-xdist, one test file per process at a time: a file's module fixtures are made once; the longest files
# first, tests/conftest.py).
test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The edit-test loop: lint, then every test that starts no server (S3, Prefect, MLflow, Ray: the `server` marker,
# set in tests/conftest.py) and is not `slow` (a whole training run or a benchmark script: tests/README.md lists
# them; `make test` runs them); a test that reaches for a Prefect API there fails at once instead of starting one.
# Whole files to a process, as `make test`: a module's fixtures (the methods' trained states, the validation
# drops) are then made once, not once in each process; the longest files first (tests/conftest.py).
check: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	CLIPLOOP_TEST_NO_SERVERS=1 $(VENV)/bin/python -m pytest -m "not server and not slow" -n 2 --dist loadfile \
		--no-loadscope-reorder

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml; tests/README.md, "Mutation testing"): mutmut
# copies the packages into mutants/ (git-ignored), mutates the core there, and runs for each mutant the fast suite's
# tests that reach the mutated function; then the score per module. Hours on 2 cores for everything: MUTANTS picks
# some by name, e.g. make mutate MUTANTS='components.registry.gate.*'. Results are kept: a rerun tries only new ones.
.PHONY: mutate
MUTANTS ?=
mutate: install-test
	CLIPLOOP_TEST_NO_SERVERS=1 OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/python -m tests.mutation_scores --survivors

# Fix what ruff can fix and format the tree (the same rules `make test` checks).
lint: install-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .cliploop .pytest_cache
