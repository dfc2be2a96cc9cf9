"""convert, infer, ckpt show/verify/diff, status, watch and plot on checkpoints the trainer made."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import TINY_LM, ckpt_list, run_cli
from trainer.checkpoint.layout import step_dir

pytestmark = pytest.mark.torchrun

FLAGS = ["--global-batch-size", "8", "--checkpoint-every", "5"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformer run written at world size 2, then resumed at 3 (so it has a resume)."""
    ckpt = tmp_path_factory.mktemp("tools") / "ckpt"
    run_cli("local", "--nproc", "2", *TINY_LM, *FLAGS, "--max-steps", "10", "--checkpoint-dir", str(ckpt), check=True)
    run_cli("local", "--nproc", "3", *TINY_LM, *FLAGS, "--max-steps", "15", "--checkpoint-dir", str(ckpt), check=True)
    return ckpt


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("toy") / "ckpt"
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "5", "--checkpoint-dir", str(ckpt), check=True)
    return ckpt


def step10(run: Path) -> Path:
    return step_dir(run, 10)


def test_dcp_to_torch_loads_weights_only_and_matches_dcp(lm_run, tmp_path):
    out = tmp_path / "full.pth"
    run_cli("convert", "dcp-to-torch", str(step10(lm_run)), str(out), check=True)
    state = torch.load(out, weights_only=True)
    from trainer.checkpoint.reader import read_model_weights

    weights = read_model_weights(step10(lm_run))
    assert state["app"]["model"].keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(state["app"]["model"][key], tensor), key
    assert state["app"]["trainer"]["step"] == 10


def test_torch_save_seeds_a_new_run_at_another_world_size(lm_run, tmp_path):
    from trainer.checkpoint.reader import read_model_weights

    weights = read_model_weights(step10(lm_run))
    seed = tmp_path / "seed.pth"
    torch.save(weights, seed)
    new_run = tmp_path / "seeded"
    run_cli("local", "--nproc", "3", *TINY_LM, *FLAGS, "--max-steps", "0", "--init-from", str(seed),
            "--checkpoint-dir", str(new_run), check=True)
    seeded = read_model_weights(step_dir(new_run, 0))
    assert all(torch.equal(seeded[key], weights[key]) for key in weights)
    proc = run_cli("local", "--nproc", "1", "--max-steps", "1", "--init-from", str(seed),
                   "--checkpoint-dir", str(tmp_path / "wrong-model"))
    assert proc.returncode == 2 and "keys do not match the model" in proc.stderr


def test_torch_to_dcp_round_trip(lm_run, tmp_path):
    pth, out_dir = tmp_path / "full.pth", tmp_path / "dcp"
    run_cli("convert", "dcp-to-torch", str(step10(lm_run)), str(pth), check=True)
    run_cli("convert", "torch-to-dcp", str(pth), str(out_dir), check=True)
    from trainer.checkpoint.reader import read_tensors

    original, converted = read_tensors(step10(lm_run)), read_tensors(out_dir)
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[key], converted[key]) for key in original)


def test_infer_without_process_group_matches_the_training_model(lm_run, toy_run):
    from trainer.tools.inference import load_model

    model, cfg = load_model(step10(lm_run))
    tokens = torch.tensor([[1, 2, 3, 4]])
    expected = model(tokens)[0, -1].argmax().item()
    proc = run_cli("infer", str(step10(lm_run)), "--input", "1,2,3,4", check=True)
    assert json.loads(proc.stdout) == [expected]
    assert len(json.loads(run_cli("infer", str(step10(lm_run)), "--input", "5 6", "--generate", "4",
                                  check=True).stdout)) == 4
    newest = run_cli("infer", str(lm_run), "--input", "1,2,3,4", check=True)  # the run's folder: its newest step
    assert json.loads(newest.stdout) == [load_model(step_dir(lm_run, 15))[0](tokens)[0, -1].argmax().item()]
    toy = json.loads(run_cli("infer", str(step_dir(toy_run, 5)), "--input", ",".join(["0.5"] * 16),
                             check=True).stdout)
    assert len(toy) == 8
    bad = run_cli("infer", str(step_dir(toy_run, 5)), "--input", "1,2")
    assert bad.returncode == 2 and "takes 16 numbers" in bad.stderr


def test_ckpt_show_lists_tensors_sharding_and_lineage(lm_run):
    out = run_cli("ckpt", "show", str(step_dir(lm_run, 15)), check=True).stdout
    assert "world size 3" in out and '"step": 10' in out and '"world_size": 2' in out
    assert "app.model.embed_tokens.weight" in out and "50x24" in out and "3 chunks along dim 0" in out


def test_ckpt_verify_catches_a_truncated_shard(lm_run, tmp_path):
    import shutil

    copy = step_dir(tmp_path, 10)
    shutil.copytree(step10(lm_run), copy)
    assert run_cli("ckpt", "verify", str(copy)).returncode == 0
    shard = copy / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = run_cli("ckpt", "verify", str(copy))
    assert proc.returncode == 1 and str(shard) in proc.stdout and "truncated" in proc.stdout
    assert run_cli("ckpt", "verify", str(lm_run)).returncode == 0
    # `ckpt list` reads no shard, but sees a file of the wrong size, or a missing one
    assert [row["damaged"] for row in ckpt_list(lm_run)] == [None] * len(ckpt_list(lm_run))
    (listed,) = ckpt_list(tmp_path)
    assert listed["damaged"] and "__0_0.distcp is" in listed["damaged"]
    shard.unlink()
    table = run_cli("ckpt", "list", str(tmp_path), check=True).stdout
    assert "DAMAGED" in table and "__0_0.distcp missing" in table


def test_ckpt_diff_identical_across_layouts_and_nonzero_after_training(lm_run, tmp_path):
    # Step 10 written by 2 ranks vs the same state re-laid out as one unsharded DCP file.
    pth, single = tmp_path / "full.pth", tmp_path / "single"
    run_cli("convert", "dcp-to-torch", str(step10(lm_run)), str(pth), check=True)
    run_cli("convert", "torch-to-dcp", str(pth), str(single), check=True)
    same = run_cli("ckpt", "diff", str(step10(lm_run)), str(single), check=True).stdout
    assert "identical" in same
    changed = run_cli("ckpt", "diff", str(step10(lm_run)), str(step_dir(lm_run, 15)), check=True).stdout
    assert "app.model.lm_head.weight" in changed and "identical" not in changed
    assert "max abs diff" in changed.splitlines()[-1]


def test_status_reports_step_loss_world_and_resumes(lm_run):
    out = run_cli("status", str(lm_run), check=True).stdout
    assert "finished" in out and "step 15/15" in out and "world size 3" in out
    assert "resumes so far: 1" in out and "world 2 -> 3" in out
    assert "last start continuing a run that had ended, restored from disk" in out, out


def test_watch_follows_until_the_run_ends(lm_run):
    proc = run_cli("watch", str(lm_run), "--timeout", "30", "--poll", "0.1", check=True)
    assert "15/15" in proc.stderr


def test_plot_writes_a_png_of_the_requested_size(lm_run, tmp_path):
    out = tmp_path / "loss.png"
    run_cli("plot", str(lm_run), "-o", str(out), "--width", "8", "--height", "4", "--dpi", "50", check=True)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (400, 200)


def test_resume_labels_a_few_steps_apart_share_one_label():
    from trainer.tools.monitor import resume_labels

    def resume(step, before, after):
        return {"resumed_from": {"step": step, "world_size": before}, "world_size": after}

    resumes = [resume(500, 1, 2), resume(10, 2, 3), resume(14, 3, 2), resume(12, 3, 3)]
    labels = resume_labels(resumes, span_steps=1000, axis_px=600)  # 20 steps per 12-px label
    assert labels == [(10, "3 resumes (steps 10-14): world 2\u21923, 3\u21923, 3\u21922"),
                      (500, "resume: world 1\u21922")]
    assert len(resume_labels(resumes, span_steps=10, axis_px=600)) == 4, "far enough apart on a short run"
