# lmforge: `make run` builds the whole pipeline on the bundled default, `make test` runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# This machine's pip config names local indexes that may not exist: hide pip's notes about them.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline switches: no hub calls, no telemetry (the README's environment table explains each one).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
# DVC stages call `python`: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run flow test bench ui ui-stop clean-venv

setup: $(STAMP)

# torch first and pinned: a CPU wheel of it lies on these machines, a looser pin pulls CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 | $(QUIET_PIP)
	touch $@

# The whole default pipeline, then the first promotion (a refused gate is reported, not fatal)
# and reports/summary.md.
run: setup
	dvc config core.analytics false
	dvc repro
	-lmforge promote lmforge-sentiment
	-lmforge promote lmforge-lm
	-lmforge promote lmforge-chat
	$(PY) -m tasks.summarize

# The same graph as a Prefect flow: each stage a task, shown in the Prefect UI (`make ui`).
flow: setup
	dvc config core.analytics false
	$(PY) -m flows.pipeline

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_data.py

# dvc.yaml's charts as dvc_plots/index.html, every one drawn offline: vega, vega-lite and
# vega-embed inlined from sha512-pinned npm tarballs (tasks/plots.py) instead of loaded from a CDN.
.PHONY: plots
plots: setup
	$(PY) -m tasks.plots

# Local servers on loopback only: the Prefect UI/API and the MLflow UI over mlflow.db.
ui: setup
	@mkdir -p .ui
	setsid prefect server start --host 127.0.0.1 --port 4200 > .ui/prefect.log 2>&1 & echo $$! > .ui/prefect.pid
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri sqlite:///mlflow.db \
		--host 127.0.0.1 --port 5000 --workers 1 > .ui/mlflow.log 2>&1 & echo $$! > .ui/mlflow.pid
	@for i in $$(seq 1 60); do curl -sf http://127.0.0.1:4200/api/health >/dev/null && break; sleep 1; done
	@echo "Prefect UI: http://127.0.0.1:4200  (export PREFECT_API_URL=http://127.0.0.1:4200/api to run flows against it)"
	@echo "MLflow UI:  http://127.0.0.1:5000  (logs in .ui/; stop both with make ui-stop)"

ui-stop:
	-kill $$(cat .ui/prefect.pid .ui/mlflow.pid 2>/dev/null) 2>/dev/null; rm -f .ui/*.pid

clean-venv:
	rm -rf $(VENV)

# Serve the registered champion on loopback: POST /invocations {"inputs": ["text", ...]}.
# MLFLOW_TRACKING_URI picks another registry; SERVE_MODEL another model (e.g. models:/lmforge-lm@champion).
.PHONY: serve
SERVE_MODEL ?= models:/lmforge-sentiment@champion
serve: setup
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	$(VENV)/bin/mlflow models serve -m $(SERVE_MODEL) --env-manager local -h 127.0.0.1 -p 5001

# Serve the chat champion over the OpenAI API on loopback (lmforge serve): /v1/models,
# /v1/completions, /v1/chat/completions (stream: true), /metrics. LLM_MODEL picks another causal LM.
.PHONY: serve-llm
LLM_MODEL ?= models:/lmforge-chat@champion
serve-llm: setup
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	$(VENV)/bin/lmforge serve $(LLM_MODEL) --host 127.0.0.1 --port 8000

# The shared servers on one local PostgreSQL 15, all on loopback (scripts/stack.sh says which
# ports and how to point a client at them: eval "$$(scripts/stack.sh env)"): MLflow, Prefect, the
# lmforge-process work pool and a worker. make stack-down stops every one of them.
.PHONY: stack stack-down
stack: setup
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down
