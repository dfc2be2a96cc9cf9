#!/usr/bin/env bash
# Make sure a Docker engine answers. Uses the running one; otherwise (as root, on Debian/Ubuntu)
# installs docker.io and starts dockerd in the background. Exit 3 with a reason when impossible.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "no Docker engine is running and this script can only install one as root with apt-get; start Docker and retry" >&2
  exit 3
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "installing docker.io ..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! pgrep -x dockerd >/dev/null 2>&1; then
  echo "starting dockerd in the background (log: /tmp/dockerd.log) ..." >&2
  nohup dockerd >/tmp/dockerd.log 2>&1 &
fi
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "dockerd did not come up within 60s; see /tmp/dockerd.log" >&2
exit 3
