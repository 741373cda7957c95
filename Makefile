# One-command set-up on a fresh machine: every target below installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPL := $(VENV)/bin/gpl
RUN_DIR ?= runs/demo

.PHONY: setup redis demo test lint bench clean

setup: $(VENV)/.installed

# Re-install only when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

redis:
	bash scripts/ensure-redis.sh

demo: setup
	$(GPL) demo --run-dir $(RUN_DIR)

test: setup redis
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy training gpl_service export feature_repo

bench: setup redis
	$(PY) benchmarks/pit_join.py

# Run directories and caches only: benchmarks/results holds the recorded (committed) figures.
clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
