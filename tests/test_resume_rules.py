"""Which checkpoint a run resumes from: committed only, newest first, explicit choice, retention."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import ckpt_list, run_cli, run_python, start_records
from trainer.checkpoint.layout import COMMIT_FILE, SUPERSEDED_DIR, list_checkpoints, step_dir

pytestmark = pytest.mark.torchrun

FLAGS = ["--global-batch-size", "8", "--checkpoint-every", "5"]


def test_uncommitted_checkpoint_is_never_resumed_from(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir), check=True)
    (step_dir(ckpt_dir, 10) / COMMIT_FILE).unlink()  # as if rank 0 died before committing
    listed = {row["step"]: row["committed"] for row in ckpt_list(ckpt_dir)}
    assert listed == {5: True, 10: False}
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "12", "--checkpoint-dir", str(ckpt_dir), check=True)
    assert start_records(ckpt_dir)[-1]["resumed_from"] == {"step": 5, "world_size": 2}
    # The partial step-10 directory was replaced by a real save at step 10 of the resumed run.
    marker = json.loads((step_dir(ckpt_dir, 10) / COMMIT_FILE).read_text())
    assert marker["resumed_from"] == {"step": 5, "world_size": 2}


def test_commit_marker_records_lineage_and_files(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "5", "--checkpoint-dir", str(ckpt_dir), check=True)
    run_cli("local", "--nproc", "3", *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir), check=True)
    recovered = start_records(ckpt_dir)[-1]["recovered_from"]  # the run before it ended normally
    assert (recovered["cause"], recovered["last_step"], recovered["steps_lost"]) == ("continued", 5, 0)
    marker = json.loads((step_dir(ckpt_dir, 10) / COMMIT_FILE).read_text())  # the file as it is on disk
    assert marker["step"] == 10 and marker["world_size"] == 3
    assert marker["resumed_from"] == {"step": 5, "world_size": 2}
    assert marker["torch_version"].startswith("2.13.0")
    on_disk = {p.name for p in step_dir(ckpt_dir, 10).iterdir()} - {COMMIT_FILE}
    assert set(marker["files"]) == on_disk
    assert marker["bytes"] == sum(p.stat().st_size for p in step_dir(ckpt_dir, 10).iterdir() if p.name != COMMIT_FILE)


def test_resume_from_step_and_no_resume(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "15", "--checkpoint-dir", str(ckpt_dir), check=True)
    run_cli("local", "--nproc", "1", *FLAGS, "--max-steps", "15", "--resume-from", "5",
            "--checkpoint-dir", str(ckpt_dir), check=True)
    assert start_records(ckpt_dir)[-1]["resumed_from"] == {"step": 5, "world_size": 2}
    # The newer checkpoints of the abandoned timeline were set aside, not deleted, and not resumable.
    assert [p.name for p in (ckpt_dir / SUPERSEDED_DIR).glob("*/step-*")] != []
    run_cli("local", "--nproc", "1", *FLAGS, "--max-steps", "15", "--no-resume",
            "--checkpoint-dir", str(ckpt_dir), check=True)
    assert start_records(ckpt_dir)[-1]["resumed_from"] is None


def test_retention_keeps_last_n_and_resumed_from(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "5", "--checkpoint-dir", str(ckpt_dir), check=True)
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "30", "--keep-last", "2",
            "--checkpoint-dir", str(ckpt_dir), check=True)
    steps = [row["step"] for row in ckpt_list(ckpt_dir)]
    assert steps == [5, 25, 30], "keeps the newest 2 plus step 5, which this run resumed from"


def test_saves_never_wait_for_retention_and_survive_its_failure(ckpt_dir):
    """Deleting old checkpoints is not part of making a new one durable: retention runs on the
    writer thread after the commit. Here it is held back, then fails; the save returned and stays."""
    script = textwrap.dedent(f"""
        import threading
        import trainer.checkpoint.manager as manager
        from trainer.checkpoint.marker import SaveReason
        from trainer.config import TrainConfig
        from trainer.train import Trainer

        trainer = Trainer(TrainConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, global_batch_size=4,
                                      checkpoint_dir={str(ckpt_dir)!r}))
        trainer.setup()
        release, finished, threads = threading.Event(), threading.Event(), []

        def held_then_failing(*args):
            threads.append(threading.current_thread().name)
            try:
                release.wait(30)
                raise OSError(5, "Input/output error")
            finally:
                finished.set()

        manager.apply_retention = held_then_failing
        loss, _ = trainer.train_step()
        trainer.checkpoints.maybe_save(1, loss, final=True)
        print("retention finished before the save returned:", finished.is_set(), flush=True)
        release.set()
        trainer.checkpoints.settle()
        print("retention ran on:", threads, flush=True)
        trainer.close()
    """)
    proc = run_python("-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retention finished before the save returned: False" in proc.stdout
    assert "retention ran on: ['checkpoint-save_0']" in proc.stdout
    assert "retention failed (" in proc.stderr and "Input/output error" in proc.stderr
    assert [(row["step"], row["committed"]) for row in ckpt_list(ckpt_dir)] == [(1, True)]


def test_the_manager_decides_when_to_save(ckpt_dir):
    """First step (then read back), every K steps, and the final step once, in either mode: the
    trainer only reports each step to the manager."""
    script = textwrap.dedent(f"""
        from trainer.config import TrainConfig
        from trainer.train import Trainer

        for mode in ("async", "sync"):
            trainer = Trainer(TrainConfig(global_batch_size=4, max_steps=9, checkpoint_every=3, keep_last=10,
                                          checkpoint_first_step=True, checkpoint_mode=mode,
                                          checkpoint_dir={str(ckpt_dir)!r} + "/" + mode))
            trainer.setup()
            trainer.run()
            trainer.close()
    """)
    proc = run_python("-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("async", "sync"):
        reasons = {info.step: info.marker.reason.value for info in list_checkpoints(ckpt_dir / mode)}
        assert reasons == {1: "first-step", 3: "periodic", 6: "periodic", 9: "final"}, (mode, reasons)


def test_a_resume_with_another_schedule_says_so_and_follows_the_new_one(ckpt_dir):
    from trainer.config import TrainConfig
    from trainer.optim.schedule import lr_multiplier

    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir), check=True)
    proc = run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "20", "--lr", "0.001", "--checkpoint-dir",
                   str(ckpt_dir), check=True)
    changes = start_records(ckpt_dir)[-1]["setting_changes"]
    old, new = TrainConfig(max_steps=10), TrainConfig(max_steps=20, lr=0.001)
    effect = f"lr at step 10 goes {old.lr * lr_multiplier(old, 10):.2e} -> {new.lr * lr_multiplier(new, 10):.2e}"
    assert changes == [f"lr schedule horizon 10 -> 20 (--max-steps with --decay-steps 0): {effect}",
                       f"lr 0.003 -> 0.001: {effect}"]
    assert all(f"resumed with another setting: {change}" in proc.stderr for change in changes)
    steps = {r["step"]: r for r in (json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "step"}
    for step in (11, 15, 20):  # the lr a step record shows is the one the next step uses
        assert steps[step]["lr"] == pytest.approx(new.lr * lr_multiplier(new, step), rel=1e-9)
    run_cli("local", "--nproc", "1", *FLAGS, "--max-steps", "20", "--lr", "0.001", "--checkpoint-dir",
            str(ckpt_dir), check=True)
    assert start_records(ckpt_dir)[-1]["setting_changes"] == [], "the same settings again: nothing to report"
