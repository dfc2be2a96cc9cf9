"""Which checkpoint a run resumes from: committed only, newest first, explicit choice, retention."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from conftest import ckpt_list, run_cli, run_python

FLAGS = ["--global-batch-size", "8", "--checkpoint-every", "5"]


def start_events(ckpt: Path) -> list[dict]:
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "start"]


def test_uncommitted_checkpoint_is_never_resumed_from(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir), check=True)
    (ckpt_dir / "step-00000010" / "commit.json").unlink()  # as if rank 0 died before committing
    listed = {row["step"]: row["committed"] for row in ckpt_list(ckpt_dir)}
    assert listed == {5: True, 10: False}
    proc = run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "12", "--checkpoint-dir", str(ckpt_dir), check=True)
    assert "resumed from step 5 (written by world size 2)" in proc.stderr
    assert start_events(ckpt_dir)[-1]["resumed_from"] == {"step": 5, "world_size": 2}
    # The partial step-10 directory was replaced by a real save at step 10 of the resumed run.
    marker = json.loads((ckpt_dir / "step-00000010" / "commit.json").read_text())
    assert marker["resumed_from"] == {"step": 5, "world_size": 2}


def test_commit_marker_records_lineage_and_files(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "5", "--checkpoint-dir", str(ckpt_dir), check=True)
    run_cli("local", "--nproc", "3", *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt_dir), check=True)
    marker = json.loads((ckpt_dir / "step-00000010" / "commit.json").read_text())
    assert marker["step"] == 10 and marker["world_size"] == 3
    assert marker["resumed_from"] == {"step": 5, "world_size": 2}
    assert marker["torch_version"].startswith("2.13.0")
    on_disk = {p.name for p in (ckpt_dir / "step-00000010").iterdir()} - {"commit.json"}
    assert set(marker["files"]) == on_disk
    assert marker["bytes"] == sum(p.stat().st_size for p in (ckpt_dir / "step-00000010").iterdir()
                                  if p.name != "commit.json")


def test_resume_from_step_and_no_resume(ckpt_dir):
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "15", "--checkpoint-dir", str(ckpt_dir), check=True)
    proc = run_cli("local", "--nproc", "1", *FLAGS, "--max-steps", "15", "--resume-from", "5",
                   "--checkpoint-dir", str(ckpt_dir), check=True)
    assert "resumed from step 5" in proc.stderr
    # The newer checkpoints of the abandoned timeline were set aside, not deleted, and not resumable.
    assert [p.name for p in (ckpt_dir / "superseded").glob("*/step-*")] != []
    proc = run_cli("local", "--nproc", "1", *FLAGS, "--max-steps", "3", "--no-resume",
                   "--checkpoint-dir", str(ckpt_dir / "fresh"), check=True)
    assert "resumed from" not in proc.stderr


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
        from trainer.config import TrainConfig
        from trainer.train import Trainer

        trainer = Trainer(TrainConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, global_batch_size=4,
                                      checkpoint_dir={str(ckpt_dir)!r}))
        trainer.setup()
        release, finished, threads = threading.Event(), threading.Event(), []

        def held_then_failing(self):
            threads.append(threading.current_thread().name)
            try:
                release.wait(30)
                raise OSError(5, "Input/output error")
            finally:
                finished.set()

        manager.CheckpointManager.apply_retention = held_then_failing
        trainer.train_step()
        trainer.checkpoints.save(1, blocking=True, reason="final")
        print("retention finished before the save returned:", finished.is_set(), flush=True)
        release.set()
        trainer.checkpoints.settle()
        print("retention ran on:", threads, flush=True)
        trainer.close()
    """)
    proc = run_python("-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retention finished before the save returned: False" in proc.stdout
    assert "retention ran on: ['checkpoint-writer_0']" in proc.stdout
    assert "retention failed (" in proc.stderr and "Input/output error" in proc.stderr
    assert [(row["step"], row["committed"]) for row in ckpt_list(ckpt_dir)] == [(1, True)]
