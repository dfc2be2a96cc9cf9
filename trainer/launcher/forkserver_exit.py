"""Imported by the workers' forkserver only (``worker.PRELOAD``): when the agent is gone, the
forkserver ends without the interpreter's teardown of the torch it preloaded (most of a second, after
every job's last step, during which it still holds the job's output open: a caller that reads that
output to its end waits for it). Its forked workers are unaffected: they always end in ``os._exit``."""

from __future__ import annotations

import atexit
import os
import sys


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


atexit.register(_exit_now)
