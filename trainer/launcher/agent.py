"""torchrun's agent, run in this process (``python -m trainer.launcher.agent ARGS`` = ``torchrun ARGS``), so
that what it knows reaches the log and the next workers in one line each:

- a worker group that failed: which worker, its exit code or signal, and that the group restarts
  from the newest checkpoint; the same facts go to a small JSON file (``FAILURE_FILE_ENV``) that
  the restarted workers put into their start record's ``recovered_from``;
- an agent that gives up (a rendezvous that timed out waiting for enough nodes, a closed or
  unreachable rendezvous, restarts used up): why, and what to check, instead of a traceback only.

It also stops a group faster: a stopped worker (SIGSTOP, a debugger) can never act on torchrun's
SIGTERM, so it is SIGKILLed at once instead of after the whole ``--shutdown-timeout``.

And it restarts warm: ``-m trainer ARGS`` runs as the function ``worker.run(ENV, *ARGS)`` in processes
forked from one forkserver that has imported torch, FSDP, DCP and the trainer already, instead of
a fresh interpreter per worker and per restart (``WARM_START_ENV=0`` turns that off).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn

from trainer.distributed.failure_file import FAILURE_FILE_ENV, write_failure
from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.launcher import torch_compat

# Only light imports up here: ``local`` imports this module before torch, and starts the agent
# process before it imports torch itself. What needs torch is imported where it is used.

AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
KEEP_ON_FAILURE_ENV = "FSDP_TRAIN_KEEP_SNAPSHOTS_ON_FAILURE"  # "1": a failed agent leaves its run's folder
HOLD_FD_ENV = "FSDP_TRAIN_AGENT_HOLD_FD"  # a pipe: "1" on it starts the run, its close without a word ends it
WARM_START_ENV = "FSDP_TRAIN_WARM_START"  # "0": every worker is a fresh interpreter, as plain torchrun starts it


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


class FailureRecorder(logging.Handler):
    """Catches the agent's "failed (exitcode: ...)" record: the first worker that failed."""

    def __init__(self, run: RunFolder) -> None:
        super().__init__(logging.ERROR)
        self.run = run
        self.restarts_left: int | None = None  # set by the agent before it looks at its workers

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("failed (exitcode") or not isinstance(record.args, tuple):
            return
        exit_code, local_rank = int(record.args[0]), record.args[1]
        failure: dict[str, Any] = {"time": record.created, "exit_code": exit_code, "local_rank": local_rank}
        if exit_code < 0:
            failure["signal"] = describe_exit(exit_code).removeprefix("signal ")
        write_failure(self.run.failure_file, failure)
        if exit_code == EXIT_USER_ERROR or self.restarts_left == 0:
            return  # the job ends here: the agent's give-up line says why
        left = "" if self.restarts_left is None else f" ({self.restarts_left} restarts left)"
        print(f"fsdp-train: worker local_rank {local_rank} failed ({describe_exit(exit_code)}); the group "
              f"restarts from the newest checkpoint{left}", file=sys.stderr, flush=True)


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


def stopped_peers_killed_first(join_all: Callable[..., None]) -> Callable[..., None]:
    """Wrap how torch's multiprocessing ends a group after one forked worker failed: it waits for
    the others, SIGTERMs them, and waits 30 s more before SIGKILL. A stopped worker can act on
    neither, so it is killed before each wait instead."""

    @wraps(join_all)
    def join_killing_stopped(self: Any, timeout: float) -> None:
        kill_stopped_workers({index: pid for index, pid in enumerate(self.pids())
                              if self.processes[index].exitcode is None})
        join_all(self, timeout)

    return join_killing_stopped


def mistakes_end_the_run(recorder: FailureRecorder) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap how torchrun's agent looks at its workers: a worker that stopped on a user error
    (``EXIT_USER_ERROR``: its one line is in the log) is not restarted, since a restart would stop
    the same way; and ``recorder`` knows how many restarts are left when it reports a failure."""

    def wrap(monitor: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(monitor)
        def monitored(self: Any, worker_group: Any) -> Any:
            recorder.restarts_left = torch_compat.restarts_left(self)
            result = monitor(self, worker_group)
            if result.is_failed() and any_mistake(result.failures):
                torch_compat.end_restarts(self)
            return result

        return monitored

    return wrap


def install_restart_policy(recorder: FailureRecorder) -> None:
    torch_compat.hook_monitor_workers(mistakes_end_the_run(recorder))


def install_fast_stop() -> None:
    """Stopped workers are killed at once when torchrun stops a group (``PContext.close``) and when
    torch's multiprocessing ends a group of forked workers after a failure."""
    from torch.distributed.elastic.multiprocessing.api import PContext

    if not getattr(PContext.close, "kills_stopped_workers", False):
        PContext.close = stopped_workers_killed_first(PContext.close)  # type: ignore[method-assign]
    torch_compat.hook_join_after_failure(stopped_peers_killed_first)


class RunFolder:
    """This run's node-local folder: the workers' memory snapshots and the failure file. Named by the
    job (its checkpoint directory) and the run, so what a job killed outright left behind is
    reclaimed by the next start of the same job, and read by no other."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.failure_file = Path(tempfile.gettempdir()) / f"fsdp-train-failure-{os.getpid()}.json"

    def open(self, train_args: list[str], run_id: str) -> None:
        """Find the job's checkpoint directory in the workers' arguments, reclaim other runs' folders,
        and tell the workers where this run's is (``FOLDER_ENV``). A config the workers will refuse
        anyway leaves the run without one."""
        from trainer.checkpoint.snapshot import FOLDER_ENV, reclaim, snapshot_folder
        from trainer.config import parse_train_args

        try:
            cfg = parse_train_args(train_args[1:])  # train_args: "train", then its flags
        except UserError:
            return
        folder = snapshot_folder(cfg.checkpoint_dir, run_id)
        try:
            reclaim(folder)
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            print(f"fsdp-train: no memory snapshots ({folder}: {exc.strerror}); failures restore from disk",
                  file=sys.stderr, flush=True)
            return
        self.path, self.failure_file = folder, folder / "failure.json"
        os.environ[FOLDER_ENV] = str(folder)
        os.environ[FAILURE_FILE_ENV] = str(self.failure_file)

    def environment(self) -> dict[str, str]:
        """What the workers learn of this run from their environment (set by ``open``)."""
        from trainer.checkpoint.snapshot import FOLDER_ENV

        return {name: os.environ[name] for name in (FOLDER_ENV, FAILURE_FILE_ENV) if name in os.environ}

    def close(self, *, failed: bool) -> None:
        """Free the folder when the job ends, is stopped or gives up; ``KEEP_ON_FAILURE_ENV`` keeps it
        after a failure (in a pod, for the container restarted in place)."""
        from trainer.checkpoint.snapshot import release

        self.failure_file.unlink(missing_ok=True)
        if self.path is not None and not (failed and os.environ.get(KEEP_ON_FAILURE_ENV) == "1"):
            release(self.path)


def job_entrypoint(config_from_args: Callable[..., Any], run: RunFolder, *, warm: bool) -> Callable[..., Any]:
    """Wrap torchrun's ``config_from_args`` for ``-m trainer train ARGS``: open the run's folder and,
    with ``warm``, make the workers the function ``worker.run`` with ``ARGS``, forked from a
    forkserver that has preloaded their imports."""

    @wraps(config_from_args)
    def wrapped(args: Any) -> tuple[Any, Any, list[Any]]:
        from trainer.distributed.runtime import run_id

        config, command, command_args = config_from_args(args)
        if not (args.module and args.training_script == "trainer" and not args.no_python):
            return config, command, command_args
        run.open(list(args.training_script_args), run_id(fallback=config.run_id))
        if not warm:
            return config, command, command_args
        from trainer.launcher import worker

        config.start_method = "forkserver"
        worker.start_forkserver()  # running already, unless main() could not tell it would be needed
        return config, worker.run, [run.environment(), *args.training_script_args]

    return wrapped


def runs_the_trainer(argv: list[str]) -> bool:
    """Whether torchrun's arguments ``argv`` run ``-m trainer``."""
    return any(flag in ("-m", "--module") and name == "trainer" for flag, name in zip(argv, argv[1:]))


def trainer_argv(argv: list[str]) -> list[str]:
    """The arguments of ``train`` in torchrun's arguments ``argv`` (``... -m trainer train ARGS``)."""
    for index, (flag, name) in enumerate(zip(argv, argv[1:])):
        if flag in ("-m", "--module") and name == "trainer":
            rest = argv[index + 2:]
            return rest[1:] if rest[:1] == ["train"] else rest
    return []


def any_mistake(failures: dict[Any, Any]) -> bool:
    """Whether any of torchrun's ``{rank: ProcessFailure}`` stopped on a user error (``EXIT_USER_ERROR``)."""
    return any(getattr(failure, "exitcode", None) == EXIT_USER_ERROR for failure in failures.values())


def stopped_on_mistake(exc: BaseException) -> bool:
    """Whether the agent gave up because a worker stopped on a user error."""
    return any_mistake(getattr(exc, "failures", None) or {})


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
        if stopped_on_mistake(exc):
            return "not restarted: a worker stopped on the error above, and a restart would stop the same way"
        return (f"worker group failed and no restarts are left: rank {rank} ended with "
                f"{describe_exit(failure.exitcode)} (see its log above)")
    if isinstance(exc, SignalException):
        return f"stopped by {signal.Signals(exc.sigval).name}"
    return None


def main(argv: list[str] | None = None) -> int:
    hold = os.environ.pop(HOLD_FD_ENV, None)  # not for the forkserver's environment
    warm = os.environ.get(WARM_START_ENV, "1") != "0"
    torchrun_argv = sys.argv[1:] if argv is None else argv
    if warm and runs_the_trainer(torchrun_argv):
        from trainer.launcher import worker

        worker.start_forkserver(trainer_argv(torchrun_argv))  # before torch's own import: the two overlap
    from torch.distributed import run as torchrun

    if hold is not None and not released(int(hold)):
        return 0  # the preflight of the `local` that started us failed: it says why
    run = RunFolder()
    os.environ[FAILURE_FILE_ENV] = str(run.failure_file)  # until the run's folder is known
    recorder = FailureRecorder(run)
    logging.getLogger(AGENT_LOGGER).addHandler(recorder)
    install_fast_stop()
    install_restart_policy(recorder)
    torchrun.config_from_args = job_entrypoint(torchrun.config_from_args, run, warm=warm)
    failed = True
    try:
        torchrun.main(argv)
        failed = False
    except BaseException as exc:  # every way out gets its one line, then the usual exit code
        reason = give_up_reason(exc)
        if reason is None:
            raise
        print(f"fsdp-train: {reason}", file=sys.stderr, flush=True)
        failed = not isinstance(exc, _signal_exception())  # a stop is not a failure
        return EXIT_USER_ERROR if stopped_on_mistake(exc) else 1
    finally:
        run.close(failed=failed)
    return 0


def _signal_exception() -> type:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    return SignalException


def released(hold: int) -> bool:
    """Wait for the go on the pipe ``hold`` (``HOLD_FD_ENV``); False when it closed without one."""
    try:
        with os.fdopen(hold, "rb") as pipe:
            return pipe.read(1) == b"1"
    except KeyboardInterrupt:  # Ctrl-C during the preflight: the whole group got it
        return False


def exit_now(code: int) -> NoReturn:
    """End a launcher process whose work is done (``local``'s, the agent's), its output flushed,
    without the interpreter's teardown of torch's modules: most of a second each, paid after
    every job's last step, and once more for each process in the chain."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
