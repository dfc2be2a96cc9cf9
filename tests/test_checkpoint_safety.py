"""Crashes, kills, corruption, a full disk, SIGTERM and a second job never cost the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    TINY_LM,
    ckpt_list,
    error_lines,
    kill_job,
    last_step,
    run_cli,
    sigterm_and_wait,
    start_cli,
    start_records,
    wait_for,
    worker_pids,
)
from trainer.checkpoint import integrity
from trainer.checkpoint.layout import COMMIT_FILE, committed_checkpoints, list_checkpoints, step_dir
from trainer.checkpoint.marker import SaveReason
from trainer.checkpoint.reader import read_tensors

pytestmark = pytest.mark.torchrun

# ~150 MB of model + optimizer state: a save takes long enough to be caught in the middle.
BIG_LM = ["--model", "transformer", "--vocab-size", "256", "--d-model", "512", "--n-layers", "4",
          "--n-heads", "8", "--seq-len", "16", "--global-batch-size", "4"]


def assert_all_committed_intact(ckpt: Path) -> None:
    committed = committed_checkpoints(ckpt)
    assert committed, "expected at least one committed checkpoint"
    for info in committed:
        assert integrity.problems(info.path, info.marker.files) == [], info.path
        assert read_tensors(info.path, "app.model."), info.path


def partial_save_in_progress(ckpt: Path) -> int | None:
    for info in list_checkpoints(ckpt):
        if not info.committed and any(info.path.glob("*.distcp")):
            return info.step
    return None


def test_sigkill_during_save_never_resumes_the_partial_checkpoint(ckpt_dir):
    job = start_cli("local", "--nproc", "2", "--max-restarts", "0", *BIG_LM, "--checkpoint-every", "2",
                    "--max-steps", "50", "--checkpoint-dir", str(ckpt_dir))
    try:
        wait_for(lambda: committed_checkpoints(ckpt_dir), 240, "a first committed checkpoint")
        partial = wait_for(lambda: partial_save_in_progress(ckpt_dir), 120, "a save in progress", interval=0.002)
        os.kill(worker_pids(str(ckpt_dir))[0], signal.SIGKILL)
        assert job.wait(timeout=120) != 0
    finally:
        kill_job(job)
    assert not (step_dir(ckpt_dir, partial) / COMMIT_FILE).exists(), \
        "the kill landed after the commit; the test did not test"
    listed = {row["step"]: row["committed"] for row in ckpt_list(ckpt_dir)}
    assert listed[partial] is False
    newest_before = committed_checkpoints(ckpt_dir)[-1].step
    run_cli("local", "--nproc", "2", *BIG_LM, "--checkpoint-every", "2", "--max-steps", str(partial + 2),
            "--checkpoint-dir", str(ckpt_dir), check=True)
    assert start_records(ckpt_dir)[-1]["resumed_from"]["step"] == newest_before
    leftovers = [row["step"] for row in ckpt_list(ckpt_dir) if not row["committed"]]
    assert leftovers == [], "the partial directory must be cleaned up once a newer checkpoint commits"
    assert_all_committed_intact(ckpt_dir)


@pytest.mark.parametrize("damage", ["truncate", "flip-byte"])
def test_damaged_shard_is_detected_and_previous_checkpoint_used(ckpt_dir, damage):
    flags = [*TINY_LM, "--global-batch-size", "8", "--checkpoint-every", "5"]
    run_cli("local", "--nproc", "2", *flags, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir), check=True)
    shard = step_dir(ckpt_dir, 10) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(data)
    proc = run_cli("local", "--nproc", "3", *flags, "--max-steps", "12", "--checkpoint-dir", str(ckpt_dir), check=True)
    warnings = [line for line in proc.stderr.splitlines() if "skipping damaged checkpoint step 10" in line]
    assert len(warnings) == 1 and str(shard) in warnings[0], proc.stderr
    assert start_records(ckpt_dir)[-1]["resumed_from"] == {"step": 5, "world_size": 2}


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"disk-full test needs to mount a small tmpfs (root); mount said: {result.stderr.strip()}")


def test_disk_full_during_save_keeps_committed_checkpoints(tmp_path):
    ckpt = tmp_path / "small-disk"
    _mount_tmpfs(ckpt, "1200k")
    try:
        proc = run_cli("local", "--nproc", "2", "--max-restarts", "0", *TINY_LM, "--global-batch-size", "8",
                       "--checkpoint-every", "2", "--keep-last", "100", "--max-steps", "40",
                       "--checkpoint-dir", str(ckpt))
        failures = [line for line in proc.stderr.splitlines() if "failed (No space left on device)" in line]
        assert failures, proc.stderr[-3000:]
        assert "previous committed checkpoint is intact" in failures[0]
        if proc.returncode == 0:  # training went on past the failed save and committed its final checkpoint
            assert committed_checkpoints(ckpt)[-1].step == 40
        else:  # or it stopped with one clear line
            assert len([line for line in error_lines(proc.stderr) if line.startswith("fsdp-train: error:")]) == 1
        assert_all_committed_intact(ckpt)
    finally:
        subprocess.run(["umount", str(ckpt)], check=False)


def test_sigterm_writes_emergency_checkpoint_and_exits_zero(ckpt_dir):
    job = start_cli("local", "--nproc", "2", *TINY_LM, "--global-batch-size", "8", "--checkpoint-every", "1000",
                    "--max-steps", "100000", "--shutdown-grace", "20", "--checkpoint-dir", str(ckpt_dir))
    try:
        wait_for(lambda: last_step(ckpt_dir) >= 20, 120, "training to reach step 20")
        code, elapsed = sigterm_and_wait(job, timeout=40)
    finally:
        kill_job(job)
    stderr = job.stderr.read()
    assert code == 0, stderr[-3000:]
    assert elapsed < 20
    newest = committed_checkpoints(ckpt_dir)[-1].marker
    assert newest.reason == SaveReason.PREEMPTED and newest.world_size == 2
    assert newest.step == last_step(ckpt_dir), "the emergency checkpoint is of the last completed step"
    assert_all_committed_intact(ckpt_dir)


def test_second_job_on_same_directory_is_refused_until_the_first_is_gone(ckpt_dir):
    first = start_cli("local", "--nproc", "1", "--max-steps", "100000", "--checkpoint-dir", str(ckpt_dir))
    try:
        wait_for(lambda: last_step(ckpt_dir) >= 5, 120, "the first job to train")
        second = run_cli("local", "--nproc", "1", "--max-steps", "3", "--checkpoint-dir", str(ckpt_dir))
        assert second.returncode == 2
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and "is in use by job" in lines[0], second.stderr
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock stays behind, its holder is gone
        first.wait(timeout=30)
        wait_for(lambda: not worker_pids(str(ckpt_dir)), 30, "orphaned workers to notice torchrun is gone")
    finally:
        kill_job(first)
    taken_over = run_cli("local", "--nproc", "1", "--max-steps", "3", "--checkpoint-dir", str(ckpt_dir))
    assert taken_over.returncode == 0, taken_over.stderr[-2000:]


def test_lock_held_elsewhere_expires_after_ttl(ckpt_dir):
    ckpt_dir.mkdir()
    lease = {"run_id": "other-job", "host": "another-node", "pid": 1, "heartbeat": time.time()}
    (ckpt_dir / "job.lock").write_text(json.dumps(lease))
    refused = run_cli("local", "--nproc", "1", "--max-steps", "2", "--checkpoint-dir", str(ckpt_dir))
    assert refused.returncode == 2 and "'other-job'" in refused.stderr
    lease["heartbeat"] = time.time() - 120  # older than the default 60 s TTL
    (ckpt_dir / "job.lock").write_text(json.dumps(lease))
    run_cli("local", "--nproc", "1", "--max-steps", "2", "--checkpoint-dir", str(ckpt_dir), check=True)
