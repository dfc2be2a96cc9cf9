"""bf16 mixed precision keeps fp32 weights and checkpoints and resumes resharded; activation
checkpointing recomputes without changing a single result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_equivalence import ATOL

from conftest import TINY_LM, run_cli, step_records
from trainer.checkpoint.layout import step_dir
from trainer.checkpoint.reader import read_tensors

pytestmark = pytest.mark.torchrun

FLAGS = [*TINY_LM, "--global-batch-size", "8", "--checkpoint-every", "3", "--no-progress"]


def train(ckpt: Path, nproc: int, until: int, *extra: str) -> None:
    run_cli("local", "--nproc", str(nproc), *FLAGS, *extra, "--max-steps", str(until), "--checkpoint-dir",
            str(ckpt), check=True)


def state(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    return read_tensors(step_dir(ckpt, step), "app.")


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    train(plain, 2, 6)
    train(recomputed, 2, 6, "--activation-checkpointing", "full")
    left, right = state(plain, 6), state(recomputed, 6)
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    print(f"\nactivation checkpointing vs none after 6 steps: max |diff| {worst:.2e}")
    assert left.keys() == right.keys() and worst <= ATOL


def test_bf16_trains_in_bf16_keeps_fp32_state_and_resumes_resharded(tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(fp32, 2, 6)
    train(bf16, 2, 6, "--mixed-precision", "bf16")
    saved = state(bf16, 6)
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}
    diff = max((saved[k] - state(fp32, 6)[k]).abs().max().item() for k in saved)
    assert diff > 10 * ATOL, f"bf16 compute must differ from fp32 (is the policy applied?): {diff:.1e}"
    train(bf16, 3, 9, "--mixed-precision", "bf16")
    losses = [r["loss"] for r in step_records(bf16)]
    reference = [r["loss"] for r in step_records(fp32)]
    print(f"\nbf16 vs fp32 loss at step 6: {losses[5]:.5f} vs {reference[5]:.5f}")
    assert len(losses) == 9 and losses[-1] < losses[0]
    assert abs(losses[5] - reference[5]) < 0.05 * reference[5], "bf16 follows fp32 closely"


def test_compiled_shard_units_train_the_same_model(tmp_path):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    train(plain, 1, 3)
    train(compiled, 1, 3, "--compile")
    left, right = state(plain, 3), state(compiled, 3)
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    print(f"\n--compile vs eager after 3 steps: max |diff| {worst:.2e}")
    assert left.keys() == right.keys() and worst <= ATOL


def test_ranks_short_of_samples_pad_their_micro_batches_without_changing_the_update(tmp_path):
    """Global batch 8 on 3 ranks is 3/3/2 samples; micro-batches of 1 make 3 on every rank, so the
    rank with 2 runs one zero-weight repeat to keep FSDP2's collectives paired."""
    whole, padded = tmp_path / "whole", tmp_path / "padded"
    train(whole, 3, 6)
    train(padded, 3, 6, "--micro-batch-size", "1")
    left, right = state(whole, 6), state(padded, 6)
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    print(f"\nmicro-batches of 1 with a padded rank vs one pass: max |diff| {worst:.2e}")
    assert left.keys() == right.keys() and worst <= ATOL
