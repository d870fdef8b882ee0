# The README's two commands: `make run` and `make test`. `make run` (scripts/run.sh) is the commands a
# user types: `cfcml dev start`, `cfcml synth men`, `ray job submit ... -- python jobs/tune_men.py`;
# `make stop` is `cfcml dev stop`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup test lint test-fast run stop bench clean

# Re-installs only when pyproject.toml changed since the last install.
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup lint
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q --timeout=900 --durations=30

# The formatter owns the layout; the linter the rest; import-linter the layers (pyproject.toml).
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test-fast: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not slow and not services"

run: setup
	bash scripts/run.sh

stop:
	bash scripts/stop.sh

bench: setup
	$(BIN)/python benchmarks/bench_mamba_scan.py

clean:
	rm -rf .cfcml-state .cfcml-cache
