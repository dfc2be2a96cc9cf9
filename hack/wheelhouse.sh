#!/usr/bin/env bash
# Collect every wheel the image needs into build/wheelhouse, on the host, so the image builds
# with no network access from inside containers (pip there may not trust the package proxy).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="$root/build/wheelhouse"
mkdir -p "$out"
rm -f "$out"/fsdp_train-*.whl
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$root" 2>&1 | grep -v "is ignored" >&2 || true
"$python" -m pip download --quiet --only-binary=:all: --dest "$out" \
  --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "$out"/fsdp_train-*.whl 2>&1 | grep -v "is ignored" >&2 || true
ls "$out"/torch-2.13.0*.whl >/dev/null 2>&1 || { echo "wheelhouse has no torch 2.13.0 wheel" >&2; exit 3; }
echo "$out: $(find "$out" -maxdepth 1 -name "*.whl" | wc -l) wheels" >&2
