"""The writer client: the trainer's handle on its writer process (``writer_server``).

It starts the process, sends it the staging memory and each save, and stops it. Writer
processes run on every rank or on none (their own gloo group needs all of them), which
``start_on_every_rank`` agrees across ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import trainer
from trainer.checkpoint import wire
from trainer.checkpoint.failures import SaveFailed
from trainer.checkpoint.marker import CommitMarker
from trainer.checkpoint.shared_arena import shared_memory_supported
from trainer.checkpoint.staging import ReusableHostStager
from trainer.checkpoint.wire import Failed, Hello, Map, Ready, Save
from trainer.distributed.runtime import Runtime, gather_union, on_primary, store_address

log = logging.getLogger("fsdp_train")

START_TIMEOUT_S = 120.0  # importing torch and meeting every other rank's writer
STOP_TIMEOUT_S = 30.0


class WriterUnavailable(Exception):
    """The writer process could not be started here; saves are written by a thread instead."""


class WriterProcessDied(Exception):
    """The writer process exited while the trainer needed it."""


class WriterClient:
    """One rank's writer process, seen from the trainer."""

    def __init__(self, hello: Hello) -> None:
        if not shared_memory_supported():
            raise WriterUnavailable("this OS has no memfd to share staging memory")
        forked = os.environ.pop(FORKED_WRITER_ENV, None)  # one writer per forked worker, used once
        if forked:
            fd, pid = (int(part) for part in forked.split(":"))
            self._sock, self._process = socket.socket(fileno=fd), ForkedProcess(pid)
        else:
            self._sock, self._process = self._spawn()
        self._mapped_generation = 0
        try:
            self._sock.settimeout(START_TIMEOUT_S)
            self._send(hello)
            reply = self._receive()
            self._sock.settimeout(None)
        except TimeoutError:
            self.close()
            raise WriterUnavailable(f"no answer from the writer process within {START_TIMEOUT_S:.0f}s") from None
        except (OSError, WriterProcessDied) as exc:
            self.close()
            raise WriterUnavailable(str(exc)) from None
        if not isinstance(reply, Ready):
            self.close()
            raise WriterUnavailable(reply.reason)

    @staticmethod
    def _spawn() -> tuple[socket.socket, subprocess.Popen]:
        """A writer process of its own: a fresh interpreter (where the worker was not forked warm)."""
        sock, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(trainer.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        with child_end:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "trainer.checkpoint.writer_server", str(child_end.fileno()),
                     str(os.getpid())], pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=env)
            except OSError as exc:
                sock.close()
                raise WriterUnavailable(f"could not start {sys.executable}: {exc.strerror}") from None
        return sock, process

    @property
    def pid(self) -> int:
        return self._process.pid

    def _receive(self) -> Any:
        try:
            message, _fds = wire.receive(self._sock)
        except (EOFError, ConnectionError):
            raise self._died() from None
        return message

    def _send(self, message: Any, fds: tuple[int, ...] = ()) -> None:
        try:
            wire.send(self._sock, message, fds)
        except ConnectionError:
            raise self._died() from None

    def _died(self) -> WriterProcessDied:
        code = self._process.wait()
        return WriterProcessDied(f"the checkpoint writer process (pid {self.pid}) exited with code {code}")

    def map(self, stager: ReusableHostStager) -> None:
        """Send the staging memory when it is new: once at start-up, and again only if the layout changed."""
        if self._mapped_generation == stager.generation:
            return
        assert stager.arena is not None and stager.arena.fd is not None
        self._send(Map(stager.arena.nbytes, stager.refs), fds=(stager.arena.fd,))
        self._mapped_generation = stager.generation

    def save(self, stager: ReusableHostStager, staged: Any, path: Path, draft: CommitMarker) -> CommitMarker | None:
        """Have the writer process save ``staged`` (a stage of ``stager``); the commit marker on the coordinator."""
        self.map(stager)
        self._send(Save(stager.slotted(staged), str(path), draft))
        reply = self._receive()
        if isinstance(reply, Failed):
            raise SaveFailed(reply.reason)
        return reply.marker

    def close(self) -> None:
        """Stop the writer: it sees the socket close, leaves its group and exits."""
        self._sock.close()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# Set by a warm worker for its trainer: "FD:PID" of the writer it forked before it started anything.
FORKED_WRITER_ENV = "FSDP_TRAIN_FORKED_WRITER"


class ForkedProcess:
    """What ``WriterClient`` needs of ``subprocess.Popen`` (wait, kill, pid), for a writer this
    process forked itself."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"writer {self.pid}", timeout)
            else:
                time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def start_on_every_rank(rt: Runtime, stager: ReusableHostStager) -> WriterClient | None:
    """A writer process on every rank, mapped to ``stager``'s memory, or None on all ranks (with the
    first rank's reason logged) when any rank cannot start one."""
    prefix = on_primary(rt, lambda: f"fsdp-train/writers/{uuid.uuid4().hex}/")
    host, port = store_address()
    client: WriterClient | None = None
    problems: list[str] = []
    try:
        # The writers' collectives wait while the slowest rank writes its shards: --collective-timeout
        client = WriterClient(Hello(rt.rank, rt.world_size, host, port, prefix, rt.collective_timeout))
        client.map(stager)
    except (WriterUnavailable, WriterProcessDied) as exc:
        problems.append(f"rank {rt.rank}: {exc}")
    problems = gather_union(rt, problems)
    if not problems:
        return client
    if client is not None:
        client.close()
    if rt.is_primary:
        log.warning("no checkpoint writer process (%s); async saves are written by a thread instead", problems[0])
    return None
