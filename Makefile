# fsdp-train: the front door. Each target is a thin call into hack/ or the fsdp-train CLI.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKPOINT_DIR ?= ./checkpoints
NPROC ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install train test bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml hack/install.sh
	PYTHON=$(PYTHON) hack/install.sh $(VENV)
	@touch $@

install: $(STAMP) ## create .venv and install the project with its test dependencies

train: install ## train locally on CPU (NPROC workers, checkpoints in CHECKPOINT_DIR; resumes if present)
	$(BIN)/fsdp-train local --nproc $(NPROC) --config configs/local.yaml --checkpoint-dir $(CHECKPOINT_DIR) $(TRAIN_ARGS)

test: install ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean: ## remove local checkpoints and caches (keeps .venv)
	rm -rf $(CHECKPOINT_DIR) .pytest_cache
