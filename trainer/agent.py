"""torchrun's agent, run in this process (``python -m trainer.agent ARGS`` = ``torchrun ARGS``), so
that what it knows reaches the log and the next workers in one line each:

- a worker group that failed: which worker, its exit code or signal, and that the group restarts
  from the newest checkpoint; the same facts go to a small JSON file (``FAILURE_FILE_ENV``) that
  the restarted workers put into their start record's ``recovered_from``;
- an agent that gives up (a rendezvous that timed out waiting for enough nodes, a closed or
  unreachable rendezvous, restarts used up): why, and what to check, instead of a traceback only.

It also stops a group faster: a stopped worker (SIGSTOP, a debugger) can never act on torchrun's
SIGTERM, so it is SIGKILLed at once instead of after the whole ``--shutdown-timeout``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

# Set for the workers (they inherit the agent's environment): where the agent wrote the last failure.
FAILURE_FILE_ENV = "FSDP_TRAIN_FAILURE_FILE"
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


class FailureRecorder(logging.Handler):
    """Catches the agent's "failed (exitcode: ...)" record: the first worker that failed."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.ERROR)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("failed (exitcode") or not isinstance(record.args, tuple):
            return
        exit_code, local_rank = int(record.args[0]), record.args[1]
        failure: dict[str, Any] = {"time": record.created, "exit_code": exit_code, "local_rank": local_rank}
        if exit_code < 0:
            failure["signal"] = describe_exit(exit_code).removeprefix("signal ")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(failure))
        os.replace(tmp, self.path)
        print(f"fsdp-train: worker local_rank {local_rank} failed ({describe_exit(exit_code)}); the group "
              "restarts from the newest checkpoint while restarts are left", file=sys.stderr, flush=True)


def read_failure(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The failure the agent recorded for this start, if any (a worker's view)."""
    path = (environ if environ is not None else os.environ).get(FAILURE_FILE_ENV)
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal or a tracer (Linux ``/proc``; elsewhere: never known)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])  # the state follows "(command)"


def kill_stopped_workers(pids: dict[int, int]) -> list[int]:
    """SIGKILL the stopped ones of ``{local_rank: pid}``; returns their local ranks."""
    killed = []
    for local_rank, pid in sorted(pids.items()):
        if is_stopped(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(local_rank)
            print(f"fsdp-train: worker local_rank {local_rank} (pid {pid}) is stopped and cannot act on "
                  "SIGTERM: killed at once", file=sys.stderr, flush=True)
    return killed


def stopped_workers_killed_first(close: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``PContext.close`` (how torchrun stops a worker group) to kill stopped workers first."""

    @wraps(close)
    def close_group(self: Any, *args: Any, **kwargs: Any) -> None:
        kill_stopped_workers(self.pids())
        close(self, *args, **kwargs)

    close_group.kills_stopped_workers = True  # type: ignore[attr-defined]
    return close_group


def install_fast_stop() -> None:
    from torch.distributed.elastic.multiprocessing.api import PContext

    if not getattr(PContext.close, "kills_stopped_workers", False):
        PContext.close = stopped_workers_killed_first(PContext.close)  # type: ignore[method-assign]


def give_up_reason(exc: BaseException) -> str | None:
    """One line for why the agent stopped, for the errors a user can act on."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    if isinstance(exc, RendezvousTimeoutError):
        return ("rendezvous timed out: fewer nodes than the minimum (PET_NNODES / --nnodes MIN) joined in time; "
                f"check that enough pods run and reach the rendezvous endpoint ({exc})")
    if isinstance(exc, RendezvousConnectionError):
        return f"cannot reach the rendezvous (is the first pod up and its DNS name resolvable?): {exc}"
    if isinstance(exc, RendezvousClosedError):
        return "the rendezvous was closed: the job is finishing or another node gave up"
    if isinstance(exc, ChildFailedError):
        rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
        return (f"worker group failed and no restarts are left: rank {rank} ended with "
                f"{describe_exit(failure.exitcode)} (see its log above)")
    if isinstance(exc, SignalException):
        return f"stopped by {signal.Signals(exc.sigval).name}"
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun

    failure_file = Path(tempfile.gettempdir()) / f"fsdp-train-failure-{os.getpid()}.json"
    os.environ[FAILURE_FILE_ENV] = str(failure_file)
    logging.getLogger(AGENT_LOGGER).addHandler(FailureRecorder(failure_file))
    install_fast_stop()
    try:
        torchrun.main(argv)
    except BaseException as exc:  # every way out gets its one line, then the usual exit code
        reason = give_up_reason(exc)
        if reason is None:
            raise
        print(f"fsdp-train: {reason}", file=sys.stderr, flush=True)
        return 1
    finally:
        failure_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
