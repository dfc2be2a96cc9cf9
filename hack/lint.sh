#!/usr/bin/env bash
# make lint: ruff (rules chosen in pyproject.toml), shellcheck on hack/ and .ci/, and
# helm lint --strict on the chart. Stops at the first tool that finds something.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-.venv}/bin"
"$bin/ruff" check .
"$bin/shellcheck" hack/*.sh .ci/run
tools="$(PYTHON="$bin/python" hack/tools.sh)"
"$tools/helm" lint --strict helm/fsdp-train
echo "lint: ruff, shellcheck and helm lint --strict found nothing"
