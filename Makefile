# Tidings: `make run` starts the service on SQLite; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= $(or $(TIDINGS_HOST),127.0.0.1)
PORT ?= $(or $(TIDINGS_PORT),8080)

.PHONY: run test lint types unit integration demo bench clean services

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/tidings serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

integration: $(STAMP)
	$(BIN)/pytest tests/integration -q

test: lint types
	$(BIN)/pytest -q

demo: $(STAMP)
	TIDINGS_ALLOW_PRIVATE_NETWORKS=true $(BIN)/tidings demo recharge

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

services:
	./.ci/services

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
