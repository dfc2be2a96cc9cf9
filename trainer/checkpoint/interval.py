"""When the next periodic checkpoint, or memory snapshot, is due: every K steps, or ``auto``.

``auto`` follows the Young/Daly optimum: saving every ``sqrt(2 * cost * MTBF)`` seconds minimises
the time lost to saves plus the time lost to redoing steps after a failure. ``cost`` is what a
save costs training here (the stall while the state is staged, plus the slowdown of the steps
that run while it is written), measured on every rank; ``MTBF`` is this job's own mean time
between failures, read from the start records in ``metrics.jsonl``; ``--expected-mtbf`` stands in
until the first failure is seen. The interval is re-evaluated at every periodic save and on every
restart, so it shortens as failures come and lengthens as the job runs without them.

Two tiers, each tuned on its own: a memory snapshot (``--snapshot-every auto``) from the snapshot's
stall and the rate of every failure (a restart restores from memory when it can); the disk tier,
while memory snapshots are on, from its own cost and the rate of the failures memory could not
cover (a restart that restored from disk: a lost node, a new pod).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fsdp_train")

FIRST_AUTO_EVERY = 10  # steps between the first auto saves: the cost is measured on the second
CLEAN_STEPS_KEPT = 50  # recent steps without a write in flight: the clean step time is their median


def young_daly_seconds(cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval, in seconds, that minimises expected lost time (first-order)."""
    return math.sqrt(2.0 * cost_s * mtbf_s)


@dataclass(frozen=True)
class FailureHistory:
    """This job's failures and how long it has been observed, from its ``metrics.jsonl``."""

    failures: int
    first_start: float  # wall time the job first started
    restored_from_disk: int = 0  # of the failures: those whose restart found no usable memory snapshot

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], now: float) -> FailureHistory:
        """``now``: this start, the first one when the records hold none."""
        starts = [record for record in records if record.get("event") == "start"]
        failed = [start for start in starts if (start.get("recovered_from") or {}).get("cause") == "failure"]
        from_disk = sum(1 for start in failed if start.get("restored_from") != "memory")
        return cls(len(failed), starts[0]["time"] if starts else now, from_disk)

    def beyond_memory(self) -> FailureHistory:
        """The failures the memory tier did not cover: what the disk tier is for, while it is on."""
        return FailureHistory(self.restored_from_disk, self.first_start, self.restored_from_disk)

    def observed_s(self, now: float) -> float:
        return max(0.0, now - self.first_start)

    def mtbf_s(self, observed_s: float, prior_s: float) -> float:
        """Before any failure: the prior, plus the time already run without one. After: the job's
        own rate; a prior that is wrong by 60x (the default hour against a kill a minute) would
        otherwise take dozens of failures to wash out."""
        if self.failures == 0:
            return observed_s + prior_s
        return max(observed_s, 1.0) / self.failures


class SaveCostMeter:
    """What one save costs training: its blocking stall, plus the time the steps that ran while it
    was written took beyond the clean step time."""

    def __init__(self) -> None:
        self._clean: deque[float] = deque(maxlen=CLEAN_STEPS_KEPT)
        self._cost: float | None = None  # of the newest save whose write has finished
        self._current: float | None = None  # of the save being written now
        self._saves = 0

    @property
    def clean_step_s(self) -> float | None:
        return statistics.median(self._clean) if self._clean else None

    @property
    def cost_s(self) -> float | None:
        return self._cost

    def step(self, seconds: float, *, writing: bool) -> None:
        """A training step finished; ``writing``: a save was being written while it ran."""
        if not writing:
            if self._current is not None:  # the write ended during the step before this one
                self._cost, self._current = self._current, None
            self._clean.append(seconds)
        elif self._current is not None and self.clean_step_s is not None:
            self._current += max(0.0, seconds - self.clean_step_s)

    def save_started(self, stall_s: float) -> None:
        """A save blocked training for ``stall_s``; its write (if any) runs during the next steps.
        The first one is not a measure: it also waits for the writer processes to start."""
        if self._current is not None:
            self._cost = self._current
        self._current = stall_s if self._saves else None
        self._saves += 1


class FixedInterval:
    """A periodic save every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def due(self, step: int, last_saved: int | None) -> bool:
        return step % self.every == 0

    def step_finished(self, seconds: float, *, writing: bool) -> None:
        pass

    def saved(self, step: int, stall_s: float) -> None:
        pass


# (cost_s, clean_step_s, observed_s) -> the same three, agreed by every rank (their maximum)
Agree = Callable[[tuple[float, float, float]], tuple[float, float, float]]


class AutoInterval:
    """Young/Daly, re-evaluated at every periodic save. Every rank decides from the same figures
    (``agree`` takes their maximum over ranks), so all ranks save at the same steps."""

    def __init__(self, expected_mtbf_s: float, history: FailureHistory, agree: Agree,
                 announce: bool = True, *, what: str = "checkpoint", first_every: int = FIRST_AUTO_EVERY,
                 evaluate_every: int = 1) -> None:
        """``what`` names the tier in the log; ``first_every``: the interval until a save has been
        measured; ``evaluate_every``: saves between two re-evaluations (each is a collective)."""
        self.every = first_every
        self.reason = f"every {first_every} steps until one has been measured"
        self._prior = expected_mtbf_s
        self._history = history
        self._agree = agree
        self._meter = SaveCostMeter()
        self._announce = announce
        self._what = what
        self._evaluate_every = evaluate_every
        self._saves = 0
        self._next_due: int | None = None

    def due(self, step: int, last_saved: int | None) -> bool:
        if self._next_due is None:
            self._next_due = (last_saved or 0) + self.every
        return step >= self._next_due

    def step_finished(self, seconds: float, *, writing: bool) -> None:
        self._meter.step(seconds, writing=writing)

    def saved(self, step: int, stall_s: float) -> None:
        """A periodic save was started after ``step``: choose when the next one is due."""
        self._meter.save_started(stall_s)
        self._saves += 1
        if self._saves % self._evaluate_every == 0:
            self._reevaluate()
        self._next_due = step + self.every

    def _reevaluate(self) -> None:
        cost, clean = self._meter.cost_s, self._meter.clean_step_s
        mine = (cost if cost is not None else -1.0, clean if clean is not None else -1.0,
                self._history.observed_s(time.time()))
        cost, clean, observed = self._agree(mine)
        if cost < 0 or clean <= 0:
            return  # no save has finished its write yet: keep the first interval
        mtbf = self._history.mtbf_s(observed, self._prior)
        every = max(1, round(young_daly_seconds(cost, mtbf) / clean))
        if every != self.every:
            source = (f"{self._history.failures} failure(s) in {observed:.0f}s" if self._history.failures
                      else f"no failure in {observed:.0f}s + prior {self._prior:.0f}s")
            reason = f"save cost {cost:.3f}s, MTBF {mtbf:.0f}s ({source}), step {clean:.3f}s"
            if self._announce:
                log.info("%s interval %d -> %d steps (auto: %s)", self._what, self.every, every, reason)
            self.every, self.reason = every, reason
