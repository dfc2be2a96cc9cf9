"""The worker entrypoint of a warm agent: a function that the agent's forkserver forks.

A fresh interpreter pays about 1.9 s to import torch, FSDP and DCP, and the first DTensor another
CPU-second for ``torch._dynamo``, on every restart. The agent instead starts one forkserver that
imports all of that once (this module, with ``PRELOAD``); each worker, the first and every restarted
one, is forked from it ready to run. torchrun's agent still owns the workers: it sets their
environment (``RANK``, ``WORLD_SIZE``, ...), watches them and stops them as it would processes it
executed itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import traceback

# What the forkserver imports before forking anything: the worker's whole import tree, and what the
# first DTensor would otherwise import on the restart path (``torch._dynamo``, most of a CPU-second).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint", "trainer.train",
           __name__, "trainer.launcher.forkserver_exit"]

PR_SET_NAME = 15
NAME_PREFIX = "fsdp-rank"  # /proc/PID/comm of a forked worker: "fsdp-rank<RANK>"
ROOT_CAUSE_FIRST_S = 0.3
WRITER_PREFIX = "fsdp-writer"  # and of the writer process it forked: "fsdp-writer<RANK>"


def name_this_process(rank: str, prefix: str = NAME_PREFIX) -> None:
    """A forked worker's command line is the forkserver's; its name in ``ps`` and ``/proc/PID/comm``
    says which rank it is (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, f"{prefix}{rank}".encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def fork_writer() -> None:
    """Fork this rank's checkpoint writer process now, while this process is still a single-threaded
    copy of the forkserver with everything imported: the writer is ready at once, where a writer
    process of its own would import torch again (two CPU-seconds per rank, on every restart). It
    waits for its trainer's first message (``writer_client.FORKED_WRITER_ENV`` says where)."""
    from trainer.checkpoint import writer_server
    from trainer.checkpoint.writer_client import FORKED_WRITER_ENV

    trainer_end, writer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the writer: it never returns into the worker's code
        trainer_end.close()
        code = 0
        try:
            name_this_process(os.environ.get("RANK", "?"), WRITER_PREFIX)
            writer_server.run(writer_end.detach(), parent)
        except BaseException:  # noqa: BLE001 - the writer's end, whatever it is
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    writer_end.close()
    os.environ[FORKED_WRITER_ENV] = f"{trainer_end.detach()}:{pid}"


def start_forkserver(train_argv: list[str] | None = None) -> None:
    """Start the forkserver the workers are forked from; it imports ``PRELOAD`` in the background
    (the first fork waits for it), and ``transformers`` too when ``train_argv`` trains an ``hf:``
    model. The agent calls this first thing, so those seconds overlap its own imports and the
    rendezvous instead of following them. The forkserver keeps the environment it started with:
    what the agent sets later reaches a worker through ``run``'s ``env``."""
    import multiprocessing
    from multiprocessing import forkserver

    extra = ["transformers", "trainer.models.hf"] if trains_hf_model(train_argv or []) else []
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD + extra)
    forkserver.ensure_running()


def trains_hf_model(train_argv: list[str]) -> bool:
    """Whether ``fsdp-train train TRAIN_ARGV`` (flags, environment, ``--config``) trains an ``hf:``
    model; a command line it cannot read says no (the worker reports it)."""
    from trainer.config import is_hf, parse_train_args
    from trainer.errors import UserError

    try:
        return is_hf(parse_train_args(train_argv).model)
    except (UserError, SystemExit):
        return False


def let_the_agent_see_the_cause_first() -> None:
    """Most often a worker fails because a peer died and its collective failed: wait until the agent,
    which looks every 0.1 s, has seen the peer's death (it then stops this worker with SIGTERM), so it
    names that as the failure, not this one; ``ROOT_CAUSE_FIRST_S`` at most. The SIGTERM ends the
    wait at once: the group's restart does not wait for the rest of it."""
    from trainer.distributed.preemption import stop_signal_received

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # from here on it is awaited, not handled
    if not stop_signal_received():
        signal.sigtimedwait({signal.SIGTERM}, ROOT_CAUSE_FIRST_S)


def run(env: dict[str, str], *argv: str) -> None:
    """``fsdp-train ARGV`` (``train ...``) in this forked process, with ``env`` added to its
    environment; exits with its code, as a worker process that torchrun executed would. A worker
    that fails exits at once: a helper thread still waiting on a peer that is gone (a save) would
    otherwise hold the exit, and the restart, until torchrun's SIGKILL 30 s later."""
    from trainer.config import parse_train_args
    from trainer.distributed.preemption import stop_signal_received
    from trainer.errors import UserError, report
    from trainer.train import main

    os.environ.update(env)
    fork_writer()
    name_this_process(os.environ.get("RANK", "?"))
    try:
        code = main(parse_train_args(list(argv[1:])))  # argv: "train", then its flags
    except UserError as exc:
        code = report(exc)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - any failure ends this worker, with its traceback
        traceback.print_exc()
        code = 1
        let_the_agent_see_the_cause_first()
    if code or stop_signal_received():  # failed, or stopped by the agent, which waits for the exit only
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)  # the end of the run: torchrun's wrapper takes this as the function's return value
