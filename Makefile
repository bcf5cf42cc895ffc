# lmforge: `make run` builds the whole pipeline on the bundled default, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline switches: no hub calls, no telemetry (../shared/STACK.md explains each one).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
# DVC stages call `python`: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test bench clean-venv

setup: $(STAMP)

# torch first and pinned: a CPU wheel of it lies on these machines, a looser pin pulls CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	dvc config core.analytics false
	dvc repro

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_data.py

clean-venv:
	rm -rf $(VENV)
