"""``make e2e-kind`` as part of the suite: runs where kind works, and is reported as skipped (with the
script's reason) where kind, Docker or kind's node image is not available."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.kind


def test_kind_end_to_end():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "e2e" / "kind_e2e.py")], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode == 77:
        reason = [line for line in proc.stderr.splitlines() if line.startswith("SKIP:")]
        pytest.skip(reason[-1] if reason else "kind end to end not available here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
