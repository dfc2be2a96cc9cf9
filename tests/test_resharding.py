"""A checkpoint written by 2 ranks loads into 1, 3 and 4 ranks with every tensor bitwise equal."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LM, dump_state

pytestmark = pytest.mark.torchrun

FLAGS = [*TINY_LM, "--global-batch-size", "12", "--checkpoint-every", "3", "--max-steps", "6"]


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reshard")
    ckpt = root / "ckpt"
    before_stop = dump_state(2, root / "before.pt", "train", *FLAGS, "--checkpoint-dir", str(ckpt))
    return ckpt, before_stop


def _assert_bitwise_equal(expected: dict, actual: dict, where: str) -> None:
    assert expected.keys() == actual.keys(), f"{where}: keys differ"
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_bitwise_equal(value, actual[key], f"{where}.{key}")
        else:
            assert isinstance(value, torch.Tensor), f"{where}.{key} is {type(value)}"
            assert value.dtype == actual[key].dtype and value.shape == actual[key].shape, f"{where}.{key}"
            assert torch.equal(value, actual[key]), f"{where}.{key} differs after resharding"


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_resume_at_other_world_size_is_bitwise_exact(saved_at_two, tmp_path, world_size):
    ckpt, before_stop = saved_at_two
    after = dump_state(world_size, tmp_path / "after.pt", "resume", *FLAGS, "--checkpoint-dir", str(ckpt))
    assert after["resumed_from"] == {"step": 6, "world_size": 2}
    assert after["whole_items"] == [], "every tensor must be read by row range, straight into its shard"
    assert (after["step"], after["samples_seen"]) == (6, 6 * 12)
    assert after["scheduler_last_epoch"] == before_stop["scheduler_last_epoch"]
    assert len(after["model"]) == 1 + 2 * 9 + 2  # embeddings; per layer 2 norms, q/k/v/o, gate/up/down; norm + head
    _assert_bitwise_equal(before_stop["model"], after["model"], "model")
    _assert_bitwise_equal(before_stop["optim"], after["optim"], "optim")
    steps = {float(state["step"]) for state in after["optim"].values()}
    assert steps == {6.0}, "Adam step counters must continue from the checkpoint"
