# fsdp-train: the front door. Each target is a thin call into hack/ or the fsdp-train CLI.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKPOINT_DIR ?= ./checkpoints
DATA_DIR ?= ./data/stdlib
NPROC ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=
IMAGE ?= fsdp-train:0.1.0
RELEASE ?= fsdp-train
REPLICAS ?= 3

.PHONY: help install data train test unit lint bench image kind-up kind-load deploy scale watch undeploy kind-down \
	chart-test values-table e2e-docker e2e-kind clean

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml hack/install.sh
	PYTHON=$(PYTHON) hack/install.sh $(VENV)
	@touch $@

install: $(STAMP) ## create .venv and install the project with its test dependencies

train: install $(DATA_DIR)/dataset.json ## train locally on CPU on the stdlib's source (NPROC workers, checkpoints in CHECKPOINT_DIR; resumes)
	$(BIN)/fsdp-train local --nproc $(NPROC) --config configs/local.yaml --data $(DATA_DIR) \
		--checkpoint-dir $(CHECKPOINT_DIR) $(TRAIN_ARGS)

data: $(DATA_DIR)/dataset.json ## prepare DATA_DIR once: the Python standard library's own source, byte tokens

$(DATA_DIR)/dataset.json: | install
	hack/stdlib-data.sh $(VENV) $(DATA_DIR)

test: install ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install ## the fast tests only: no torchrun, no Docker, no kind (under 2 minutes)
	$(BIN)/python -m pytest -m "not torchrun and not docker and not kind" $(PYTEST_ARGS)

lint: install ## ruff, shellcheck, helm lint --strict (every ci/*-values.yaml), values table, trainer schema, doc links
	hack/lint.sh $(VENV)

values-table: install ## regenerate the chart values table in docs/kubernetes.md from helm/fsdp-train/values.yaml
	$(BIN)/python hack/values_table.py

bench: install ## checkpoint (1.5 GB, 2 ranks), training speed vs a plain loop, overhead, recovery, goodput (~35 min)
	$(BIN)/python -m bench.checkpoint --json bench-checkpoint.json
	$(BIN)/python -m bench.train --json bench-train.json
	$(BIN)/python -m bench.overhead --json bench-overhead.json
	$(BIN)/python -m bench.recovery --json bench-recovery.json
	$(BIN)/python -m bench.goodput --minutes 3 --json bench-goodput.json

image: install ## build IMAGE (public base, or offline: local debootstrap base + host wheelhouse)
	hack/image.sh $(IMAGE)

kind-up: ## create the kind cluster from k8s/ (needs kind and Docker)
	hack/kind.sh up

kind-load: ## load IMAGE into the kind cluster
	hack/kind.sh load $(IMAGE)

deploy: ## helm install the chart into the kind cluster (k8s/values-kind.yaml)
	hack/kind.sh deploy $(RELEASE)

scale: ## helm upgrade to REPLICAS worker pods; the job resumes resharded
	hack/kind.sh scale $(RELEASE) $(REPLICAS)

watch: ## follow the worker logs of the release
	hack/kind.sh watch $(RELEASE)

undeploy: ## helm uninstall (the checkpoint claim is kept)
	hack/kind.sh undeploy $(RELEASE)

kind-down: ## delete the kind cluster
	hack/kind.sh down

chart-test: install ## helm lint, render every kind, validate against Kubernetes, JobSet and Kubeflow models
	$(BIN)/python -m pytest tests/test_chart.py

e2e-docker: install ## the rendered chart's pods as containers: scale, kill, drain, resume
	$(BIN)/python -m pytest -rs -s tests/test_e2e_docker.py

e2e-kind: install ## kind end to end; exits 77 with the reason where kind is not available
	$(BIN)/python tests/e2e/kind_e2e.py

clean: ## remove local checkpoints and caches (keeps .venv)
	rm -rf $(CHECKPOINT_DIR) .pytest_cache
