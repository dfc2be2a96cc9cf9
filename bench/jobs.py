"""Running a local job from a benchmark (or a test) and reading what happened to it.

Shared by ``bench.recovery``, ``bench.goodput`` and the tests: the worker processes of a job,
its start records, and the moments torchrun's agent logged.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trainer.launcher.worker import NAME_PREFIX
from trainer.metrics.records import read_metrics

MAKE_TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


def job_settings(config: str | Path | None) -> dict[str, Any]:
    """The settings of a bench's job: ``config`` (a YAML file), by default ``make train``'s."""
    return yaml.safe_load(Path(config or MAKE_TRAIN_CONFIG).read_text())


# torchrun's agent logs in glog format: "W1201 12:52:04.129000 3972 .../api.py:1028] message"
AGENT_LINE = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) +\d+ (\S+)\] (.*)$")
# what the agent logs when it acts on a failed worker group: it stops the rest (workers it executed:
# "closing signal"; workers it forked: "Closing process" or, on a failure, "Terminating process"),
# or reports the failure
AGENT_REACTS = ("closing signal", "Closing process", "Terminating process", "failed (exitcode")


def _ancestors_cmdlines(pid: int, depth: int = 4) -> list[bytes]:
    """The command lines of ``pid``'s parent, grandparent, ... (``depth`` of them at most)."""
    found = []
    for _ in range(depth):
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])
            found.append((Path("/proc") / str(pid) / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            break
    return found


def worker_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the trainer workers of the job whose command line contains ``marker`` (e.g. its
    checkpoint dir): workers forked by a warm agent (named ``fsdp-rank<RANK>``, the job's agent among
    their ancestors), or fresh interpreters running ``train`` (with ``RANK`` in their environment)."""
    found = {}
    needle = marker.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            if comm.startswith(NAME_PREFIX) and comm[len(NAME_PREFIX):].isdigit():
                if any(needle in cmdline for cmdline in _ancestors_cmdlines(int(proc.name))):
                    found[int(comm[len(NAME_PREFIX):])] = int(proc.name)
                continue
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"train" not in cmdline or needle not in cmdline:
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def records(checkpoint_dir: Path, event: str) -> list[dict[str, Any]]:
    return [record for record in read_metrics(checkpoint_dir) if record.get("event") == event]


def last_step(checkpoint_dir: Path) -> int:
    steps = records(checkpoint_dir, "step")
    return steps[-1]["step"] if steps else 0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def agent_events(log: str, since: float) -> list[tuple[float, str]]:
    """(wall time, message) of torchrun agent log lines (in the text ``log``) at or after ``since``."""
    year = dt.datetime.fromtimestamp(since).year
    found = []
    for line in log.splitlines():
        match = AGENT_LINE.match(line)
        if not match:
            continue
        month, day, hour, minute, second, micro = (int(part) for part in match.groups()[:6])
        when = dt.datetime(year, month, day, hour, minute, second, micro).timestamp()
        if when >= since - 0.001:  # glog truncates to milliseconds here
            found.append((when, match.group(8)))
    return found


def spawn_time(start: dict[str, Any]) -> float:
    """When the processes of a start were spawned: its record is written after the first step, and
    its phases (from ``process_start``) add up to the time since."""
    phases = start.get("phases") or {}
    return start["time"] - sum(value for value in phases.values() if isinstance(value, (int, float)))


def first_reaction(log: str, since: float) -> float | None:
    """When torchrun's agent first acted on a failure after ``since`` (it stops the group, or
    reports a failed worker), from its log."""
    return next((when for when, message in agent_events(log, since)
                 if any(reaction in message for reaction in AGENT_REACTS)), None)


def breakdown(event: float, start: dict[str, Any], reacted: float | None) -> dict[str, Any]:
    """Where the seconds from ``event`` to the end of the first step after it went: detection (to
    the agent's reaction), stop (to the new workers' spawn), restart (to the end of their first
    step), total; with the steps lost and the restart's phases."""
    spawned = spawn_time(start)
    reacted = spawned if reacted is None else reacted
    return {"detection_s": reacted - event, "stop_s": spawned - reacted, "restart_s": start["time"] - spawned,
            "total_s": start["time"] - event, "steps_lost": (start.get("recovered_from") or {}).get("steps_lost", 0),
            "restored_from": start.get("restored_from"), "phases": start.get("phases") or {}}


# How a recovery ran before the memory tier and the warm agent ("cold": a fresh interpreter per
# worker and a restore from disk), and how it runs now ("warm", the defaults): the benches run both.
MODES: dict[str, tuple[list[str], dict[str, str]]] = {
    "cold": (["--snapshot-every", "0"], {"FSDP_TRAIN_WARM_START": "0"}),
    "warm": ([], {}),
}


class LocalJob:
    """``fsdp-train local`` in the background, its own session, output to ``log``."""

    def __init__(self, checkpoint_dir: Path, log: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.dir, self.log = checkpoint_dir, log
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "trainer", "local", *flags,
                                          "--checkpoint-dir", str(checkpoint_dir)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @staticmethod
    def kill_pid(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it died by itself meanwhile
            pass

    def workers(self) -> dict[int, int]:
        return worker_pids(str(self.dir))

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM (an emergency checkpoint, then exit 0), SIGKILL of the session if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
