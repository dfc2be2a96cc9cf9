#!/usr/bin/env bash
# Create the virtualenv and install fsdp-train with its test and lint dependencies.
# torch is pinned to 2.13.0; to get the CPU build on Linux, point pip at PyTorch's
# CPU wheel index first (PIP_EXTRA_INDEX_URL), or have the wheel in PIP_FIND_LINKS.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,lint]" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "import torch, trainer; print(f'installed fsdp-train {trainer.__version__} with torch {torch.__version__}')"
