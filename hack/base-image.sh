#!/usr/bin/env bash
# Build a local Debian bookworm base image (python3 + venv) with debootstrap + docker import,
# for machines that cannot pull from a container registry. Usage: hack/base-image.sh IMAGE_NAME
# The Debian mirror is the one this machine's apt already uses (or debootstrap's default).
set -euo pipefail
image="${1:-fsdp-train-base:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image already present" >&2
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "building $image needs root (debootstrap); run as root or pass BASE_IMAGE=<an image you can pull>" >&2
  exit 3
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
mirror="$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | head -n1 | tr -d ' ' || true)"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm -> $image ..." >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" ${mirror:+"$mirror"} >/tmp/debootstrap.log 2>&1 \
  || { echo "debootstrap failed; see /tmp/debootstrap.log" >&2; exit 3; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "built $image" >&2
