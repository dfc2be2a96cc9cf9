"""Restarts from memory, with real workers: a start restores from the memory snapshots only when
every rank can, falls back to disk with its one-line reason otherwise, and either way lands exactly
on the uninterrupted trajectory. The snapshots' life under ``fsdp-train local``: freed at the end,
on Ctrl-C and on a give-up; what a job killed outright left is reclaimed by its next start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    TINY_LM,
    kill_job,
    last_step,
    start_cli,
    start_records,
    step_records,
    wait_for,
    worker_pids,
)
from trainer.checkpoint.layout import committed_checkpoints
from trainer.checkpoint.reader import read_tensors
from trainer.checkpoint.snapshot import FOLDER_ENV, ROOT_ENV, job_key

pytestmark = pytest.mark.torchrun

# Synchronous saves: a checkpoint is committed when its step ends, so a kill lands between two known ones.
FLAGS = [*TINY_LM, "--global-batch-size", "8", "--checkpoint-every", "8", "--checkpoint-mode", "sync",
         "--log-every", "1", "--lr", "3e-3"]
STEPS = 40  # long enough that the kill below lands well before the end
RUN = "run-1"


def workers(nproc: int, ckpt: Path, folder: Path, run_id: str, *extra: str, wait: bool = True):
    """``fsdp-train train`` under plain torchrun, its memory tier in ``folder`` (as the agent would set)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", FOLDER_ENV: str(folder),
           "FSDP_TRAIN_RUN_ID": run_id, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "trainer", "train", *FLAGS, "--checkpoint-dir", str(ckpt), *extra]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_state(ckpt: Path) -> dict:
    return read_tensors(committed_checkpoints(ckpt)[-1].path, "app.")


def assert_on_the_uninterrupted_trajectory(ckpt: Path, reference: Path, tolerance: float = 0.0) -> None:
    assert step_records(ckpt)[-1]["step"] == STEPS
    assert step_records(ckpt)[-1]["loss"] == pytest.approx(step_records(reference)[-1]["loss"], abs=max(tolerance,
                                                                                                        1e-7))
    ours, theirs = final_state(ckpt), final_state(reference)
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[key].double() - theirs[key].double()).abs().max()) for key in ours)
    assert worst <= tolerance, f"largest difference {worst:g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    workers(2, ckpt, tmp_path_factory.mktemp("reference-shm"), "reference", "--max-steps", str(STEPS))
    return ckpt


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, Path]:
    """A run SIGKILLed whole (workers and torchrun) two steps past a committed checkpoint (one every 8
    steps), with the settings of the restarts below (a snapshot is only restored under the settings
    it was taken with): a snapshot after every step, each rank's two newest kept in memory."""
    base = tmp_path_factory.mktemp("killed")
    ckpt, folder = base / "ckpt", base / "shm" / RUN
    job = workers(2, ckpt, folder, RUN, "--max-steps", str(STEPS), wait=False)
    ranks: dict[int, int] = {}
    try:
        # torchrun starts its workers in sessions of their own: they are killed by pid, with torchrun, at once
        ranks = wait_for(lambda: len(found := worker_pids(str(ckpt))) == 2 and found, 120, "both workers")
        wait_for(lambda: (committed := committed_checkpoints(ckpt)) and last_step(ckpt) >= committed[-1].step + 2,
                 240, "two steps past a committed checkpoint", interval=0.002)
    finally:
        for pid in ranks.values():
            os.kill(pid, signal.SIGKILL)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    wait_for(lambda: not any(map(running, ranks.values())), 30, "the workers gone")
    return ckpt, folder


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: it waits only to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def copy_of(killed: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    ckpt, folder = killed
    shutil.copytree(ckpt, tmp_path / "ckpt")
    shutil.copytree(folder, tmp_path / "shm" / RUN)
    return tmp_path / "ckpt", tmp_path / "shm" / RUN


def snapshot_steps(folder: Path, rank: int) -> list[int]:
    return sorted(json.loads(path.read_text())["step"] for path in (folder / f"rank-{rank}").glob("slot-*.json"))


def relabel(folder: Path, rank: int, shift: int) -> None:
    for path in (folder / f"rank-{rank}").glob("slot-*.json"):
        manifest = json.loads(path.read_text())
        manifest["step"] += shift
        path.write_text(json.dumps(manifest))


def test_a_restart_restores_from_memory_onto_the_uninterrupted_trajectory(killed, reference, tmp_path: Path):
    ckpt, folder = copy_of(killed, tmp_path)
    newest_disk = committed_checkpoints(ckpt)[-1].step
    # the newest step both ranks hold complete (the kill may have caught one in the middle of a snapshot)
    newest_snapshot = max(set(snapshot_steps(folder, 0)) & set(snapshot_steps(folder, 1)))
    assert newest_snapshot > newest_disk
    proc = workers(2, ckpt, folder, RUN, "--max-steps", str(STEPS))
    start = start_records(ckpt)[-1]
    assert start["restored_from"] == "memory" and start["resumed_from"]["step"] == newest_snapshot, proc.stderr[-2000:]
    assert "from memory snapshots" in proc.stderr
    assert_on_the_uninterrupted_trajectory(ckpt, reference)


def delete_rank_1(folder: Path) -> None:
    shutil.rmtree(folder / "rank-1")


def different_steps(folder: Path) -> None:
    relabel(folder, 1, 10)


def older_than_disk(folder: Path) -> None:
    for rank in (0, 1):
        relabel(folder, rank, -100)


@pytest.mark.parametrize(("change", "nproc", "run_id", "reason"), [
    (delete_rank_1, 2, RUN, "rank 1 holds no snapshot"),
    (different_steps, 2, RUN, "the ranks hold snapshots of different steps"),
    (None, 3, RUN, "holds a snapshot written at world size 2, not 3"),
    (older_than_disk, 2, RUN, "are older than the newest checkpoint"),
    (None, 2, "run-2", "rank 0 holds a snapshot of another run (run-1)"),
], ids=["a rank without", "different steps", "world size changed", "older than disk", "another run"])
def test_a_start_falls_back_to_disk_saying_why_and_stays_exact(killed, reference, tmp_path: Path, change, nproc,
                                                                 run_id, reason):
    ckpt, folder = copy_of(killed, tmp_path)
    if change is not None:
        change(folder)
    newest_disk = committed_checkpoints(ckpt)[-1].step
    proc = workers(nproc, ckpt, folder, run_id, "--max-steps", str(STEPS))
    lines = [line for line in proc.stderr.splitlines() if "restoring from disk, not memory" in line]
    assert len(lines) == 1 and reason in lines[0], proc.stderr[-3000:]
    start = start_records(ckpt)[-1]
    assert start["restored_from"] == "disk" and start["resumed_from"]["step"] == newest_disk
    # the same world size replays bit for bit; another one sums in another order (the trainer's 1e-5)
    assert_on_the_uninterrupted_trajectory(ckpt, reference, tolerance=0.0 if nproc == 2 else 1e-5)


# ---- the snapshots' life under `fsdp-train local` ---------------------------------------------------
def job_folder(shm: Path, ckpt: Path) -> Path:
    return shm / job_key(ckpt)


def local(ckpt: Path, shm: Path, *extra: str):
    return start_cli("local", "--nproc", "2", *FLAGS, "--checkpoint-dir", str(ckpt), *extra, env={ROOT_ENV: str(shm)})


def test_snapshots_are_freed_at_the_end_on_ctrl_c_and_on_a_give_up_and_reclaimed_after_a_kill(tmp_path: Path):
    shm, ckpt = tmp_path / "shm", tmp_path / "ckpt"
    # SIGKILL of the whole job, agent included: its snapshots stay behind ...
    job = local(ckpt, shm, "--max-steps", "1000")
    try:
        wait_for(lambda: committed_checkpoints(ckpt) and last_step(ckpt) >= 9, 240, "step 9, past a checkpoint")
    finally:
        kill_job(job)
    left = [run.name for run in job_folder(shm, ckpt).iterdir()]
    assert len(left) == 1 and (job_folder(shm, ckpt) / left[0] / "rank-1").is_dir()
    # ... until the next start of the same job, which reclaims them unread, and frees its own at the end
    job = local(ckpt, shm, "--max-steps", "12")
    assert job.wait(timeout=240) == 0, job.stderr.read()[-3000:]
    assert start_records(ckpt)[-1]["restored_from"] == "disk", "another run's snapshots are never read"
    assert not job_folder(shm, ckpt).exists()
    # Ctrl-C: the emergency checkpoint, then nothing left
    job = local(ckpt, shm, "--max-steps", "1000")
    try:
        wait_for(lambda: last_step(ckpt) >= 15, 240, "step 15")
        job.send_signal(signal.SIGINT)
        assert job.wait(timeout=120) == 0, job.stderr.read()[-3000:]
    finally:
        kill_job(job)
    assert not job_folder(shm, ckpt).exists()
    # a give-up (no restarts left after a failed worker): nothing left either, the failure file included
    job = local(ckpt, shm, "--max-steps", "1000", "--max-restarts", "0")
    try:
        wait_for(lambda: last_step(ckpt) >= 19, 240, "step 19")
        os.kill(wait_for(lambda: worker_pids(str(ckpt)).get(1), 30, "worker 1"), signal.SIGKILL)
        assert job.wait(timeout=120) != 0
    finally:
        kill_job(job)
    assert not job_folder(shm, ckpt).exists()
