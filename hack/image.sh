#!/usr/bin/env bash
# Build the trainer image. Online when the public base image can be had; otherwise offline from a
# local debootstrap base and a host-side wheelhouse. Usage: hack/image.sh IMAGE [online|offline|auto]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
image="${1:-fsdp-train:0.1.0}"
mode="${2:-auto}"
public_base="python:3.11-slim-bookworm"
local_base="fsdp-train-base:bookworm"
"$root/hack/docker-engine.sh"
if [[ "$mode" == auto ]]; then
  if docker image inspect "$public_base" >/dev/null 2>&1 || timeout 60 docker pull -q "$public_base" >/dev/null 2>&1; then
    mode=online
  else
    echo "cannot pull $public_base: building offline from a local base image and a host wheelhouse" >&2
    mode=offline
  fi
fi
mkdir -p "$root/build/wheelhouse"
if [[ "$mode" == offline ]]; then
  "$root/hack/base-image.sh" "$local_base"
  "$root/hack/wheelhouse.sh"
  docker build -q -t "$image" --build-arg BASE_IMAGE="$local_base" --build-arg WHEELHOUSE=1 "$root" >/dev/null
else
  docker build -q -t "$image" "$root" >/dev/null
fi
echo "built $image ($mode, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
