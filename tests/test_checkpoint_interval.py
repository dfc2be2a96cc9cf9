"""`--checkpoint-every auto` and `--snapshot-every auto`: the Young/Daly interval from the measured save
(or snapshot) cost and the job's failures; the disk tier's from the failures memory did not cover."""

from __future__ import annotations

import math
import re
import time

import pytest

from conftest import TINY_LM, run_cli
from trainer.checkpoint.interval import (
    FIRST_AUTO_EVERY,
    AutoInterval,
    FailureHistory,
    SaveCostMeter,
    young_daly_seconds,
)
from trainer.checkpoint.layout import committed_checkpoints


def identity(values):
    return values


def interval_after(save_stall_s: float, history: FailureHistory, prior_s: float = 3600.0,
                   step_s: float = 0.1) -> int:
    """Drive an AutoInterval through two periodic saves and return the interval it then chooses."""
    auto = AutoInterval(prior_s, history, identity, announce=False)
    step, last_saved = 0, None
    for _ in range(4 * FIRST_AUTO_EVERY):
        step += 1
        auto.step_finished(step_s, writing=False)
        if auto.due(step, last_saved):
            auto.saved(step, save_stall_s)
            last_saved = step
            auto.step_finished(step_s, writing=True)  # the write slows nothing: its cost is the stall
            auto.step_finished(step_s, writing=False)
            step += 2
    return auto.every


def history(failures: int, observed_s: float) -> FailureHistory:
    return FailureHistory(failures, time.time() - observed_s)


def test_young_daly_optimum():
    assert young_daly_seconds(0.5, 3600) == pytest.approx(math.sqrt(3600))


def test_frequent_failures_shorten_the_interval():
    calm = interval_after(0.5, history(failures=0, observed_s=600))
    stormy = interval_after(0.5, history(failures=10, observed_s=600))
    assert stormy < calm
    # the figures: MTBF 600 + 3600 (no failure yet: the prior stands) vs 600 / 10, step 0.1 s, cost 0.5 s
    assert calm == round(math.sqrt(2 * 0.5 * 4200) / 0.1)
    assert stormy == round(math.sqrt(2 * 0.5 * 60) / 0.1)


def test_expensive_saves_lengthen_the_interval():
    cheap = interval_after(0.05, history(failures=3, observed_s=300))
    costly = interval_after(2.0, history(failures=3, observed_s=300))
    assert costly > cheap


def test_the_first_interval_holds_until_a_save_was_measured():
    auto = AutoInterval(3600, history(0, 0), identity, announce=False)
    assert [step for step in range(1, 31) if auto.due(step, None)][:1] == [FIRST_AUTO_EVERY]


def test_save_cost_is_the_stall_plus_the_slowdown_while_writing():
    meter = SaveCostMeter()
    meter.save_started(1.5)  # the first save also starts the writer processes: not a measure
    for _ in range(5):
        meter.step(0.10, writing=False)
    assert meter.cost_s is None
    meter.save_started(0.30)
    meter.step(0.15, writing=True)
    meter.step(0.12, writing=True)
    assert meter.cost_s is None, "known once the write has ended"
    meter.step(0.10, writing=False)
    assert meter.cost_s == pytest.approx(0.30 + 0.05 + 0.02)


def test_failures_come_from_the_start_records():
    records = [{"event": "start", "time": 100.0, "recovered_from": {"cause": "fresh"}},
               {"event": "step", "time": 110.0},
               {"event": "start", "time": 130.0, "recovered_from": {"cause": "failure"}},
               {"event": "start", "time": 160.0, "recovered_from": {"cause": "preempted"}},
               {"event": "start", "time": 190.0, "recovered_from": {"cause": "failure"}}]
    found = FailureHistory.from_records(records, now=999.0)
    assert FailureHistory.from_records([], now=5.0).first_start == 5.0
    assert (found.failures, found.first_start) == (2, 100.0)
    assert found.mtbf_s(found.observed_s(200.0), prior_s=300.0) == pytest.approx(100 / 2)


def test_the_disk_tier_counts_only_the_failures_memory_did_not_cover():
    records = [{"event": "start", "time": 100.0},
               *({"event": "start", "time": 100.0 + 10 * i, "recovered_from": {"cause": "failure"},
                  "restored_from": tier} for i, tier in enumerate(["memory", "memory", "disk", "memory"], 1))]
    found = FailureHistory.from_records(records, now=999.0)
    assert (found.failures, found.restored_from_disk) == (4, 1)
    beyond = found.beyond_memory()
    assert (beyond.failures, beyond.first_start) == (1, 100.0)
    assert interval_after(0.5, beyond) > interval_after(0.5, found), "the disk tier saves less often"


def test_memory_snapshots_on_auto_follow_their_own_stall_from_every_step():
    auto = AutoInterval(3600, history(failures=6, observed_s=360), identity, announce=False,
                        what="memory snapshot", first_every=1)
    taken, last = [], None
    for step in range(1, 41):
        auto.step_finished(0.1, writing=False)
        if auto.due(step, last):
            auto.saved(step, 0.001 if taken else 0.5)  # the first also maps its slot: not a measure
            taken.append(step)
            last = step
    assert taken[:2] == [1, 2], "every step until a snapshot has been measured"
    assert auto.every == round(math.sqrt(2 * 0.001 * 60) / 0.1), "Young/Daly: 1 ms stall, MTBF 60 s, 0.1 s steps"


@pytest.mark.torchrun
def test_auto_interval_in_a_two_rank_run(ckpt_dir):
    proc = run_cli("local", "--nproc", "2", *TINY_LM, "--global-batch-size", "8", "--max-steps", "80",
                   "--checkpoint-every", "auto", "--snapshot-every", "auto", "--expected-mtbf", "30",
                   "--keep-last", "100", "--checkpoint-dir", str(ckpt_dir), "--no-progress", check=True)
    changes = re.findall(r"checkpoint interval (\d+) -> (\d+) steps \(auto: save cost ([0-9.]+)s, MTBF", proc.stderr)
    assert changes, proc.stderr[-3000:]
    assert re.search(r"memory snapshot interval 1 -> \d+ steps \(auto: save cost", proc.stderr), proc.stderr[-3000:]
    assert int(changes[0][0]) == FIRST_AUTO_EVERY
    steps = [c.marker.step for c in committed_checkpoints(ckpt_dir)]
    assert steps[0] == FIRST_AUTO_EVERY and steps[-1] == 80
    gaps = {b - a for a, b in zip(steps[1:-2], steps[2:-1])}
    assert gaps <= {int(to) for _, to, _ in changes} | {FIRST_AUTO_EVERY}, (steps, changes)
