# Two commands do all set-up: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint ci serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cli.demo

# The test files run in parallel, one worker a core (at most 4: each worker starts its own Prefect test server);
# TEST_WORKERS=0 runs them in this one process (for --pdb, or to read one test's timing alone).
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

test: $(STAMP) lint
	$(PYTEST) --durations=25

# Undefined names and unused imports anywhere; strict types in the domain package (STYLE.md), types elsewhere.
lint: $(STAMP)
	$(BIN)/ruff check --select F .
	$(BIN)/mypy --strict rollout
	$(BIN)/mypy serving tasks flows cli

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not e2e"

ci: $(STAMP)
	$(BIN)/rollout ci --config rollout.yaml

clean:
	rm -rf .rollout
