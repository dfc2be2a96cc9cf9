"""What the ``start`` record of ``metrics.jsonl`` says about a worker start: how long each
start-up phase took, and what the start recovered from.

Recovery time is the sum of these phases (plus the detection and the restart torchrun does),
so each worker start records them: what to cut is then read off the records, not guessed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was created (forked or executed), where the OS says: its start
    in clock ticks since boot (``/proc/self/stat``) against the time since boot now (``/proc/stat``'s
    whole-second boot time would be off by up to a second)."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, since_boot - started_ticks / os.sysconf("SC_CLK_TCK"))


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


def what_it_recovered_from(resumed_step: int | None, resumed_reason: str | None, resumed_world: int | None,
                           world_size: int, earlier: list[dict[str, Any]],
                           agent_failure: dict[str, Any] | None = None) -> dict[str, Any]:
    """The start record's ``recovered_from``: ``fresh``, ``failure``, ``preempted``, ``scale`` (an
    emergency checkpoint resumed at another world size) or ``continued`` (the run before ended
    normally); with the last step the job logged before this start, when, and the steps lost.
    A failure this node's agent saw (``trainer.agent``) adds the worker's exit code or signal and
    the time the agent noticed it."""
    if resumed_step is None:
        return {"cause": "fresh"}
    steps = [record for record in earlier if record.get("event") == "step"]
    last_event = next((record["event"] for record in reversed(earlier) if record.get("event") != "step"), None)
    if resumed_reason == "preempted" or last_event == "preempted":
        cause = "scale" if resumed_world != world_size else "preempted"
    elif last_event == "end":
        cause = "continued"
    else:
        cause = "failure"
    found: dict[str, Any] = {"cause": cause}
    if steps:
        last = steps[-1]
        found.update(last_step=last["step"], last_step_time=last.get("time"),
                     steps_lost=max(0, last["step"] - resumed_step))
    # The failure is this start's if the agent noticed it after the run segment before this one began
    # (a survivor may still log the step the failed worker finished just before it died).
    last_start = next((record.get("time", 0) for record in reversed(earlier) if record.get("event") == "start"), 0)
    noticed_after_last_start = agent_failure and agent_failure.get("time", 0) >= last_start
    if cause == "failure" and noticed_after_last_start:
        found.update(exit_code=agent_failure["exit_code"], failed_at=agent_failure["time"],
                     **({"signal": agent_failure["signal"]} if "signal" in agent_failure else {}))
    return found
