#!/usr/bin/env bash
# make lint: ruff (rules chosen in pyproject.toml), shellcheck on hack/ and .ci/, helm lint --strict
# on the chart with its defaults and with each ci/*-values.yaml, the values table in docs/kubernetes.md
# against values.yaml, the chart's trainer schema against TrainConfig, and the docs' links and command
# coverage. Stops at the first tool that finds something.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-.venv}/bin"
"$bin/ruff" check .
"$bin/shellcheck" hack/*.sh .ci/run
tools="$(PYTHON="$bin/python" hack/tools.sh)"
"$tools/helm" lint --strict --quiet helm/fsdp-train
for values in helm/fsdp-train/ci/*-values.yaml; do
  "$tools/helm" lint --strict --quiet helm/fsdp-train --values "$values"
done
"$bin/python" hack/values_table.py --check
"$bin/python" hack/trainer_schema.py --check
"$bin/python" hack/check_docs.py
echo "lint: ruff, shellcheck, helm lint --strict, the values table, the trainer schema and the docs found nothing"
