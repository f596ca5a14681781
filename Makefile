# petpipe: `make repro` sets up .venv (if missing) and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch wheels differ per platform; these versions are the ones tested. Override on other
# platforms, e.g.  make TORCH="torch torchvision" repro
TORCH ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?=

.PHONY: help venv repro test test-fast clean-venv

help:
	@echo "make repro                  set up $(VENV) if needed, then run the pipeline (dvc repro)"
	@echo "make repro PROFILE=pets     copy profiles/pets.yaml to params.yaml first, then run"
	@echo "make test                   set up $(VENV) if needed, then run the test suite"
	@echo "make test-fast              the same without the slow tests (end-to-end pipeline, MLflow server)"

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
PYTEST_WORKERS ?= 2

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
