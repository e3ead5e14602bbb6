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

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra --durations=25

# Undefined names and unused imports anywhere; strict types in the domain package (STYLE.md), types elsewhere.
lint: $(STAMP)
	$(BIN)/ruff check --select F .
	$(BIN)/mypy --strict rollout
	$(BIN)/mypy serving tasks flows cli

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not e2e"

ci: $(STAMP)
	$(BIN)/rollout ci --config rollout.yaml

clean:
	rm -rf .rollout
