#!/usr/bin/env bash
# Prepare the token dataset `make train` uses: the Python standard library's own source, which
# every machine with Python has (found with sysconfig), as byte tokens. Installed packages and the
# test suites' data files are left out; a stray non-UTF-8 file is skipped and counted.
set -euo pipefail
venv="${1:-.venv}"
out="${2:-./data/stdlib}"
stdlib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
"$venv/bin/fsdp-train" prepare-data "$stdlib" --out "$out" --exclude '*/site-packages/*' \
  --exclude '*/dist-packages/*' --exclude '*/test/*' --exclude '*/tests/*' --non-utf8 skip
