"""How long each start-up phase of a worker took, for the ``start`` record of ``metrics.jsonl``.

Recovery time is the sum of these phases (plus the detection and the restart torchrun does),
so each worker start records them: what to cut is then read off the records, not guessed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was created (interpreter start and imports), where the OS says."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return max(0.0, time.time() - (boot + started_ticks / os.sysconf("SC_CLK_TCK")))


class PhaseClock:
    """Laps of the start-up, in order: ``lap(name)`` closes the phase that ran since the last lap."""

    def __init__(self) -> None:
        since_start = seconds_since_process_start()
        self.phases: dict[str, float | dict | None] = {
            "process_start": None if since_start is None else round(since_start, 3)}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Close phase ``name``: the time since the last lap."""
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 3)
        self._last = now

    def record(self, timed: dict[str, float | dict[str, float]]) -> None:
        """Phases another component timed itself (the checkpoint manager's restore and writer start);
        the next lap starts now."""
        self.phases.update(_rounded(timed))
        self._last = time.perf_counter()


def _rounded(value: float | dict) -> float | dict:
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 3)
