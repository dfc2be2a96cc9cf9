"""Each mistake is one clear line naming the input and the fix, with no traceback and nothing lost."""

from __future__ import annotations

import pytest

from conftest import ckpt_list, error_lines, run_cli

pytestmark = pytest.mark.torchrun


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_flag():
    assert_one_line_error(run_cli("train", "--max-stepz", "3"), "--max-stepz", "fsdp-train train --help")


def test_checkpoint_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_cli("local", "--nproc", "1", "--checkpoint-dir", str(blocker / "ckpt"))
    assert_one_line_error(proc, "--checkpoint-dir", "writable")
    proc = run_cli("train", "--checkpoint-dir", str(blocker / "ckpt"))  # the worker's own check
    assert_one_line_error(proc, "--checkpoint-dir", "writable")


def test_world_size_larger_than_global_batch(ckpt_dir):
    proc = run_cli("local", "--nproc", "3", "--global-batch-size", "2", "--checkpoint-dir", str(ckpt_dir))
    assert_one_line_error(proc, "world size 3", "--global-batch-size 2")


def test_model_config_differs_from_checkpoint(ckpt_dir):
    run_cli("local", "--nproc", "1", "--model", "transformer", "--d-model", "16", "--n-heads", "2",
            "--max-steps", "2", "--checkpoint-dir", str(ckpt_dir), check=True)
    before = ckpt_list(ckpt_dir)
    proc = run_cli("local", "--nproc", "1", "--model", "transformer", "--d-model", "32", "--n-heads", "2",
                   "--max-steps", "4", "--checkpoint-dir", str(ckpt_dir))
    assert_one_line_error(proc, "d_model=16 in checkpoint vs 32 now", "--no-resume")
    proc = run_cli("train", "--model", "toy", "--max-steps", "4", "--checkpoint-dir", str(ckpt_dir))
    assert_one_line_error(proc, "model='transformer' in checkpoint vs 'toy' now")
    assert ckpt_list(ckpt_dir) == before, "a refused resume must not touch the checkpoints"


def test_bad_config_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("max_steps: 3\nlearning_rate: 0.1\n")
    assert_one_line_error(run_cli("train", "--config", str(config)), "learning_rate", str(config))
    config.write_text("max_steps: many\n")
    assert_one_line_error(run_cli("train", "--config", str(config)), "max_steps='many'")


@pytest.mark.parametrize("nnodes", ["0:4", "4:", "two", "1:4:8"])
def test_launch_elastic_range_is_checked_before_torchrun(nnodes):
    assert_one_line_error(run_cli("launch", "--nnodes", nnodes), "--nnodes", "MIN:MAX", repr(nnodes))


def test_a_mistake_only_a_worker_finds_ends_the_job_at_once_with_its_line(ckpt_dir):
    from trainer.checkpoint.layout import committed_checkpoints

    flags = ["--model", "transformer", "--d-model", "16", "--n-heads", "2", "--global-batch-size", "4",
             "--checkpoint-every", "3", "--checkpoint-dir", str(ckpt_dir)]
    run_cli("local", "--nproc", "2", *flags, "--max-steps", "4", check=True)
    pinned = next(info for info in committed_checkpoints(ckpt_dir) if info.step == 3)
    next(pinned.path.glob("*.distcp")).unlink()  # the preflight does not read a pinned step's files: a worker does
    proc = run_cli("local", "--nproc", "2", *flags, "--max-steps", "6", "--resume-from", "3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    mistakes = [line for line in proc.stderr.splitlines() if line.startswith("fsdp-train: error:")]
    assert mistakes and len(set(mistakes)) == 1 and len(mistakes) <= 2, "one line, from one attempt (per rank)"
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fsdp-train: ")]
    assert not any("restarts" in line for line in ours), "not retried, and not said to be"
    assert ours[-1] == ("fsdp-train: not restarted: a worker stopped on the error above, and a restart would stop "
                        "the same way"), ours
