# petpipe: `make repro` sets up .venv (if missing) and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch wheels differ per platform; these versions are the ones tested. Override on other
# platforms, e.g.  make TORCH="torch torchvision" repro
TORCH ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?=

.PHONY: help venv repro lint test test-fast clean-venv ui

help:
	@echo "make repro                  set up $(VENV) if needed, then run the pipeline (dvc repro)"
	@echo "make repro PROFILE=pets     copy profiles/pets.yaml to params.yaml first, then run"
	@echo "make lint                   ruff: the linter, and the formatter's check (120 columns; pyproject.toml)"
	@echo "make test                   set up $(VENV) if needed, lint, then run the test suite"
	@echo "make test-fast              the same without the slow tests (end-to-end pipeline, MLflow server)"
	@echo "make ui                     the MLflow UI on 127.0.0.1:$(UI_PORT) against mlflow.db; prints the runs table's address"

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

repro: venv
ifneq ($(PROFILE),)
	test -f profiles/$(PROFILE).yaml || { echo "no profile profiles/$(PROFILE).yaml; have: $$(ls profiles)"; exit 2; }
	cp profiles/$(PROFILE).yaml params.yaml
endif
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# Two pytest workers: most of the suite's time is process start-up and imports, which are
# single-threaded. --dist loadfile keeps a module's fixtures (the e2e repository) in one worker.
# One intra-op thread per process (unless OMP_NUM_THREADS is set): with two workers and the stage
# processes they start, torch's default of one thread per core oversubscribes the cores
# (benchmarks/RESULTS.md, "Test suite").
PYTEST_WORKERS ?= 2
# Warm stage processes (petpipe.run.warm) are off by default; PETPIPE_WARM=0 keeps them off for the tests even where
# the caller's shell turned them on (a test running one stage would start a server for nothing). The tests that
# need them turn them on themselves (tests/run/test_warm.py, the end-to-end build).
TEST_ENV = PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PETPIPE_WARM=$${PETPIPE_WARM:-0}

# One formatter and linter (ruff, settings in pyproject.toml); `ruff format .` rewrites, this only checks.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint
	$(TEST_ENV) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: venv
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The MLflow UI against the default store; the address printed opens the experiment's runs table
# (one row per pipeline execution), not MLflow 3's GenAI overview.
UI_PORT ?= 5000
ui: venv
	@$(BIN)/python -c "import sqlite3, sys; \
	  row = sqlite3.connect('mlflow.db').execute(\"SELECT experiment_id FROM experiments WHERE name = 'petpipe'\").fetchone() if __import__('os').path.exists('mlflow.db') else None; \
	  print(f'MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments/{row[0]}/runs' if row else 'no runs yet (make repro first); MLflow UI: http://127.0.0.1:$(UI_PORT)')"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

clean-venv:
	rm -rf $(VENV)
