"""One job per checkpoint directory: a lease file with a heartbeat.

The holder (rank 0) refreshes the lease every ``ttl / 3`` seconds. Another job
is refused while the lease is fresh; a lease whose heartbeat is older than
``ttl``, or whose holder process is gone from this very host, is stale and is
taken over, so a crashed job cannot keep the directory forever. Restarts of
the same job (same run id: torchrun restarts, replaced pods) re-acquire it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from trainer.checkpoint.layout import write_json_atomic
from trainer.errors import UserError

LOCK_FILE = "job.lock"


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


class JobLock:
    def __init__(self, root: Path, run_id: str, ttl: float) -> None:
        self.path = Path(root) / LOCK_FILE
        self.run_id = run_id
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _lease(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _is_stale(self, lease: dict[str, Any]) -> bool:
        if time.time() - float(lease.get("heartbeat", 0)) > self.ttl:
            return True
        return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0)))

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as out:
                json.dump(self._lease(), out)
        except FileExistsError:
            ours = (self._read() or {}).get("run_id") == self.run_id  # a restart of this job: no race to settle
            self.refuse_if_held()
            write_json_atomic(self.path, self._lease())
            if ours:
                self._start_heartbeat()
                return
        time.sleep(0.2)  # a job that raced us to the file wins or loses here, not later
        holder = self._read()
        if not holder or holder.get("run_id") != self.run_id:
            self._refuse(holder or {})
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="job-lock-heartbeat", daemon=True)
        self._thread.start()

    def refuse_if_held(self) -> None:
        """Raise if another job holds a live lease on the directory."""
        holder = self._read()
        if holder and holder.get("run_id") != self.run_id and not self._is_stale(holder):
            self._refuse(holder)

    def _refuse(self, holder: dict[str, Any]) -> None:
        age = time.time() - float(holder.get("heartbeat", 0))
        raise UserError(
            f"--checkpoint-dir {self.path.parent} is in use by job {holder.get('run_id')!r} on host "
            f"{holder.get('host')!r} (pid {holder.get('pid')}, heartbeat {age:.0f}s ago): stop that job, "
            f"point this one at another directory, or wait {self.ttl:.0f}s after it stops"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                write_json_atomic(self.path, self._lease())
            except OSError:
                pass  # a full disk must not kill training; the lease just ages

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = self._read()
            if holder and holder.get("run_id") == self.run_id:
                self.path.unlink(missing_ok=True)
