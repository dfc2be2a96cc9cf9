"""Which checkpoint a run resumes from: committed only, newest first, explicit choice, retention."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ckpt_list, run_cli

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
