"""In-place recovery under `fsdp-train local`: a killed worker, a hung one, a stop during start-up.

The job must recover by itself, every time, and land on the same trajectory; a hang must cost
`--collective-timeout` plus torchrun's restart, never torch's default 10 or 30 minutes.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from conftest import (
    TINY_LM,
    kill_job,
    last_step,
    run_cli,
    sigterm_and_wait,
    start_cli,
    start_records,
    step_records,
    wait_for,
    worker_pids,
)
from trainer.checkpoint.layout import committed_checkpoints
from trainer.checkpoint.lock import LOCK_FILE
from trainer.tools.monitor import PHASE_NAMES

pytestmark = pytest.mark.torchrun

FLAGS = [*TINY_LM, "--global-batch-size", "8", "--checkpoint-every", "5"]


def recovered_after(ckpt: Path, starts_before: int, timeout: float) -> float:
    """Seconds until a new run segment completed its first step (its start record is written then)."""
    started = time.monotonic()
    wait_for(lambda: len(start_records(ckpt)) > starts_before, timeout, "a new start after the failure",
             interval=0.05)
    return time.monotonic() - started


def kill_after_some_steps(ckpt: Path, rank: int, sig: signal.Signals) -> int:
    """Wait for three more steps, then send ``sig`` to worker ``rank``; returns the start records' count."""
    reached = last_step(ckpt)
    wait_for(lambda: last_step(ckpt) >= reached + 3, 120, "three more steps")
    starts = len(start_records(ckpt))
    os.kill(wait_for(lambda: worker_pids(str(ckpt)).get(rank), 30, f"worker {rank}"), sig)
    return starts


def test_ten_sigkills_in_a_row_each_recover_in_place(ckpt_dir, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    job = start_cli("local", "--nproc", "2", "--max-restarts", "12", *FLAGS, "--max-steps", "100000",
                    "--checkpoint-dir", str(ckpt_dir), log=log)
    recoveries: list[float] = []
    try:
        wait_for(lambda: committed_checkpoints(ckpt_dir), 240, "a first checkpoint")
        for attempt in range(10):
            starts = kill_after_some_steps(ckpt_dir, attempt % 2, signal.SIGKILL)
            recoveries.append(recovered_after(ckpt_dir, starts, timeout=120))
            assert job.poll() is None, f"the job gave up after kill {attempt + 1}: {log.read_text()[-3000:]}"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        kill_job(job)
    print(f"\n10 SIGKILLs: recovery (kill -> resumed start) median {statistics.median(recoveries):.1f}s, "
          f"max {max(recoveries):.1f}s: {', '.join(f'{s:.1f}' for s in recoveries)}")
    starts = start_records(ckpt_dir)
    resumed = [start["resumed_from"] for start in starts]
    assert len(resumed) == 11 and all(resumed[1:]), f"each restart resumed from a checkpoint: {resumed}"
    assert [start["recovered_from"]["cause"] for start in starts] == ["fresh"] + ["failure"] * 10
    for start in starts:
        assert set(PHASE_NAMES) <= set(start["phases"]), start["phases"]
        assert all(isinstance(start["phases"][name], float) for name in PHASE_NAMES)


def test_a_killed_worker_recovers_onto_the_uninterrupted_trajectory(tmp_path: Path) -> None:
    reference, killed, log = tmp_path / "reference", tmp_path / "killed", tmp_path / "job.log"
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "30", "--checkpoint-dir", str(reference), check=True)
    job = start_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "30", "--checkpoint-dir", str(killed), log=log)
    try:
        wait_for(lambda: last_step(killed) >= 12, 240, "training to pass step 12")
        os.kill(worker_pids(str(killed))[1], signal.SIGKILL)
        assert job.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        kill_job(job)
    restart = start_records(killed)[-1]
    assert restart["resumed_from"]["step"] >= 10, "recovered from the newest checkpoint"
    recovered = restart["recovered_from"]
    assert recovered["cause"] == "failure" and recovered["last_step"] >= 12 and 0 <= recovered["steps_lost"] < 10
    assert (recovered["signal"], recovered["exit_code"]) == ("SIGKILL", -9), "what the agent saw reaches the record"
    assert recovered["failed_at"] <= restart["time"]
    assert "fsdp-train: worker local_rank 1 failed (signal SIGKILL)" in log.read_text()
    assert step_records(killed)[-1]["loss"] == pytest.approx(step_records(reference)[-1]["loss"], abs=1e-6)


def test_a_hung_worker_is_restarted_within_the_collective_timeout(ckpt_dir, tmp_path: Path) -> None:
    timeout, log = 10, tmp_path / "job.log"
    job = start_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "100000", "--collective-timeout", str(timeout),
                    "--checkpoint-dir", str(ckpt_dir), log=log)
    try:
        wait_for(lambda: last_step(ckpt_dir) >= 3, 240, "training to start")
        starts = kill_after_some_steps(ckpt_dir, 1, signal.SIGSTOP)  # a hang: alive, silent
        recovery = recovered_after(ckpt_dir, starts, timeout=timeout + 120)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        kill_job(job)
    print(f"\nSIGSTOP of one worker with --collective-timeout {timeout}: trained again after {recovery:.1f}s")
    text = log.read_text()
    assert "is stopped and cannot act on SIGTERM: killed at once" in text, text[-3000:]
    assert "Unable to shutdown process" not in text, "the stopped worker waited out torch's 30 s SIGTERM grace"
    # The target (timeout + 35 s) is a figure to report, not to time here; what must hold is that the
    # setting bounds the hang: with the default 120 s (or torch's 10 min) this would take minutes.
    assert recovery < timeout + 90, f"{recovery:.1f}s: the hang was not bounded by --collective-timeout"


def test_a_stop_during_start_up_ends_the_workers_at_once(ckpt_dir) -> None:
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "5", "--checkpoint-dir", str(ckpt_dir), check=True)
    job = start_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir))
    try:
        # rank 0 takes the job lock after joining the process group: start-up is well under way
        wait_for(lambda: (ckpt_dir / LOCK_FILE).exists(), 60, "the workers to be starting", interval=0.01)
        code, elapsed = sigterm_and_wait(job, timeout=60)
    finally:
        kill_job(job)
    assert code == 0, job.stderr.read()[-3000:]
    assert "stopped during start-up, before any step: nothing new to save (newest checkpoint: step 5)" \
        in job.stderr.read()
    assert elapsed < 25, f"{elapsed:.1f}s: a worker still starting must not wait for torchrun's 30 s SIGKILL"
    assert last_step(ckpt_dir) == 5
