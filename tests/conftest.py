"""Shared helpers: run the real CLI and torchrun as subprocesses (CPU, gloo)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bench.jobs import last_step, records, worker_pids  # noqa: F401  (tests import them from here)
from bench.jobs import wait_for as _wait_for

# bench.jobs.wait_for, polling as often as the tests need (a benchmark polls ten times less often)
wait_for = functools.partial(_wait_for, interval=0.005)

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"
TIMEOUT = 300

# Small but non-trivial transformer: vocab and widths chosen so 3 and 4 ranks shard unevenly.
TINY_LM = ["--model", "transformer", "--vocab-size", "50", "--d-model", "24", "--n-layers", "2",
           "--n-heads", "4", "--seq-len", "12", "--ffn-mult", "2"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


class WarmCli:
    """``python -m trainer ARGS`` as a child forked from ``helpers/cli_server.py``, which imported
    torch and the trainer once (see there): the same process, without seconds of imports each time."""

    def __init__(self) -> None:
        self.server: subprocess.Popen | None = None
        self.pending = b""
        self.lock = threading.Lock()

    def run(self, args: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "trainer", *args]
        with self.lock, tempfile.TemporaryDirectory(prefix="fsdp-train-cli-") as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            server = self.running()
            request = {"argv": list(args), "env": _env(), "cwd": str(ROOT), "out": str(out), "err": str(err)}
            server.stdin.write((json.dumps(request) + "\n").encode())
            server.stdin.flush()
            deadline = time.monotonic() + timeout
            pid = self.reply(deadline + 120)["pid"]  # the server's imports, the first time
            deadline = time.monotonic() + timeout
            try:
                code = self.reply(deadline)["status"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.reply(time.monotonic() + 30)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def running(self) -> subprocess.Popen:
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, str(HELPERS / "cli_server.py")], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, env=_env(), cwd=ROOT)
            self.pending = b""
        return self.server

    def reply(self, deadline: float) -> dict:
        """The server's next JSON line, by ``deadline`` (``time.monotonic``)."""
        fd = self.server.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise subprocess.TimeoutExpired("cli_server", left)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the test suite's CLI server ended ({self.server.wait()}); see the log above")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)


WARM_CLI = WarmCli()
atexit.register(WARM_CLI.close)


def run_cli(*args: str, timeout: int = TIMEOUT, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m trainer ARGS`` to its end (see ``WarmCli``), its output captured."""
    proc = WARM_CLI.run(args, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fsdp-train {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def run_python(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """``python *args`` (``-c CODE``, ``-m MODULE ...``) in the project root, as the CLI runs."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def run_torchrun(nproc: int, script: Path, *args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script.name} {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def dump_state(nproc: int, out: Path, mode: str, *flags: str) -> dict:
    import torch

    run_torchrun(nproc, HELPERS / "dump_state.py", str(out), mode, *flags)
    return torch.load(out, weights_only=False)


def draft_marker(step: int):
    """A commit marker as the manager drafts it before a save (the storage writer completes it)."""
    from trainer.checkpoint.marker import CommitMarker, SaveReason

    return CommitMarker(step=step, world_size=1, reason=SaveReason.PERIODIC)


def ckpt_list(directory: Path) -> list[dict]:
    return json.loads(run_cli("ckpt", "list", str(directory), "--json", check=True).stdout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def start_cli(*args: str, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``fsdp-train ARGS`` in the background (its own session, so signals reach only it).

    Its output goes to pipes, read once it ends; a long run that prints much (tracebacks of killed
    workers) must pass ``log``, a file, or it blocks once a pipe fills.
    """
    out = subprocess.PIPE if log is None else log.open("w")
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=out, stderr=subprocess.STDOUT
                            if log is not None else subprocess.PIPE, text=True, env={**_env(), **(env or {})}, cwd=ROOT,
                            start_new_session=True)


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL a job started by ``start_cli`` and everything in its session (torchrun too; its
    workers exit when they see torchrun gone), so a failed test leaves nothing running."""
    import signal

    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def sigterm_and_wait(job: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Send SIGTERM to a job started by ``start_cli``; its exit code and the seconds until it exited."""
    import signal
    import time

    signalled = time.monotonic()
    job.send_signal(signal.SIGTERM)
    code = job.wait(timeout=timeout)
    return code, time.monotonic() - signalled


def step_records(ckpt: Path) -> list[dict]:
    return records(ckpt, "step")


def start_records(ckpt: Path) -> list[dict]:
    """The ``start`` records of ``metrics.jsonl``: one per worker-group start, with ``resumed_from``."""
    return records(ckpt, "start")
