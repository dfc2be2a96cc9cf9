"""Config layering (defaults < YAML < environment < flags) and world-size-free data addressing."""

from __future__ import annotations

import pytest
import torch

from trainer.cli import build_parser
from trainer.config import TrainConfig, config_to_args, resolve_config
from trainer.data import SyntheticData, rank_slice
from trainer.errors import UserError


def parse(*flags: str, environ: dict | None = None) -> TrainConfig:
    return resolve_config(build_parser().parse_args(["train", *flags]), environ=environ or {})


def test_layers_flags_win_over_env_over_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 7\nlr: 0.5\nseed: 3\ncheckpoint-every: 2\n")
    env = {"FSDP_TRAIN_LR": "0.25", "FSDP_TRAIN_SEED": "4", "FSDP_TRAIN_NO_RESUME": "true"}
    cfg = parse("--config", str(config), "--seed", "5", environ=env)
    assert (cfg.max_steps, cfg.lr, cfg.seed, cfg.checkpoint_every, cfg.no_resume) == (7, 0.25, 5, 2, True)
    assert parse().max_steps == TrainConfig().max_steps


def test_config_round_trips_through_flags():
    cfg = parse("--model", "transformer", "--d-model", "32", "--no-resume", "--lr", "0.01")
    assert resolve_config(build_parser().parse_args(["train", *config_to_args(cfg)]), environ={}) == cfg


def test_bad_env_value_names_the_variable():
    with pytest.raises(UserError, match="FSDP_TRAIN_MAX_STEPS"):
        parse(environ={"FSDP_TRAIN_MAX_STEPS": "ten"})


@pytest.mark.parametrize("global_batch", [1, 7, 10, 32])
def test_rank_slices_tile_the_global_batch(global_batch):
    for world in range(1, global_batch + 1):
        slices = [rank_slice(global_batch, world, rank) for rank in range(world)]
        sizes = [stop - start for start, stop in slices]
        assert slices[0][0] == 0 and slices[-1][1] == global_batch
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("model", ["toy", "transformer"])
def test_samples_do_not_depend_on_how_the_batch_is_split(model):
    data = SyntheticData(TrainConfig(model=model, seq_len=8, vocab_size=20))
    whole_x, whole_y = data.batch(100, 10)
    parts = [data.batch(100 + start, stop - start) for start, stop in (rank_slice(10, 3, r) for r in range(3))]
    assert torch.equal(whole_x, torch.cat([x for x, _ in parts]))
    assert torch.equal(whole_y, torch.cat([y for _, y in parts]))
    assert not torch.equal(whole_x, data.batch(110, 10)[0])
