# fogline developer commands; `make` alone lists them.
.DEFAULT_GOAL := help
.PHONY: help setup demo test lint bench clean

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

help: ## List the targets
	@echo "fogline make targets:"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-7s %s\n", $$1, $$2}'

setup: ## Create .venv, install fogline[dev], install Mosquitto if missing (idempotent)
	@scripts/setup.sh

demo: setup ## Run the pipeline: 200 devices, 2 edges, 60 s, data in .fogline/demo
	$(VENV)/bin/fogline up --devices 200 --edges 2 --duration 60 --data-dir .fogline/demo --clean

test: setup ## Run the test suite (each integration test starts its own Mosquitto)
	$(PY) -m pytest tests $(PYTEST_ARGS)

lint: setup ## ruff check, ruff format --check, mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup ## Run the benchmarks and update BENCHMARKS.md
	$(PY) -m bench

clean: ## Remove .fogline/ data and caches (keeps .venv)
	rm -rf .fogline .pytest_cache .mypy_cache .ruff_cache build
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
