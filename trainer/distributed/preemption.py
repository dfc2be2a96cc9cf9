"""SIGTERM/SIGINT become a request to checkpoint and stop, agreed by all ranks.

Kubernetes stops a pod with SIGTERM (torchrun forwards it to the workers); the
handler only records it. The training loop folds the flag into its per-step
all-reduce, so every rank stops after the same step and joins the emergency
save. A watchdog bounds the whole shutdown by ``--shutdown-grace`` seconds.

Before the loop starts there is nothing new to save, so a stop request then ends
the worker at once (``exit_at_once``): the signals keep their default action,
which works even while the worker is blocked in C++ (joining a process group).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("fsdp_train")

EXIT_PEER_PREEMPTED = 75  # EX_TEMPFAIL: a peer was stopped; torchrun should restart this worker
EXIT_GRACE_EXCEEDED = 124
EXIT_ORPHANED = 1

_received: list[str] = []  # every stop signal this process was sent, in order


def stop_signal_received() -> str | None:
    """The first SIGTERM/SIGINT this process was sent while training, if any: then whoever started
    it is stopping it, and waits for it to exit, not for a result."""
    return _received[0] if _received else None


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._watchdog: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @staticmethod
    def exit_at_once() -> None:
        """Start-up: SIGTERM and SIGINT end the process right away (their default action)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    def install(self) -> None:
        """Training: SIGTERM and SIGINT only record the request; the loop acts on it."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        _received.append(signal.Signals(signum).name)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def start_deadline(self, seconds: float) -> None:
        """Exit non-zero if the emergency checkpoint has not finished in ``seconds``."""
        started = time.monotonic()

        def expire() -> None:
            log.error("emergency checkpoint did not finish within --shutdown-grace %.0fs (%.0fs elapsed); exiting",
                      seconds, time.monotonic() - started)
            os._exit(EXIT_GRACE_EXCEEDED)

        self._watchdog = threading.Timer(seconds, expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def cancel_deadline(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()


def exit_when_orphaned(poll_seconds: float = 1.0) -> None:
    """Exit if our launcher (torchrun) dies without stopping us.

    torchrun starts workers in their own sessions, so a SIGKILLed torchrun leaves
    them running, still holding the job lock and writing checkpoints.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        log.error("the launching process (pid %d) is gone; exiting", parent)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
