# petpipe: `make repro` sets up .venv (if missing) and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch wheels differ per platform; these versions are the ones tested. Override on other
# platforms, e.g.  make TORCH="torch torchvision" repro
TORCH ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?=

.PHONY: help venv repro test clean-venv

help:
	@echo "make repro                  set up $(VENV) if needed, then run the pipeline (dvc repro)"
	@echo "make repro PROFILE=pets     copy profiles/pets.yaml to params.yaml first, then run"
	@echo "make test                   set up $(VENV) if needed, then run the test suite"

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

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
