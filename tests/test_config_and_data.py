"""Config layering (defaults < YAML < environment < flags) and world-size-free data addressing."""

from __future__ import annotations

import pytest
import torch

from trainer.cli import build_parser
from trainer.config import TrainConfig, config_to_args, resolve_config
from trainer.data.loader import SyntheticData, rank_slice
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


def test_both_tiers_take_a_step_count_or_auto():
    cfg = parse("--checkpoint-every", "auto", "--snapshot-every", "AUTO")
    assert (cfg.checkpoint_every, cfg.snapshot_every) == ("auto", "auto")
    assert resolve_config(build_parser().parse_args(["train", *config_to_args(cfg)]), environ={}) == cfg
    assert parse("--snapshot-every", "0").snapshot_every == 0
    with pytest.raises(UserError, match="--snapshot-every must be >= 0"):
        parse("--snapshot-every", "-1")
    with pytest.raises(SystemExit):  # argparse: "invalid step count or 'auto' value"
        parse("--snapshot-every", "sometimes")


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


def test_every_rank_runs_the_same_number_of_micro_batches_of_at_most_the_size():
    from trainer.train import micro_batches

    for global_batch in range(1, 13):
        for world in range(1, global_batch + 1):
            shares = [b - a for a, b in (rank_slice(global_batch, world, r) for r in range(world))]
            for size in (None, 1, 2, 3, 5):
                spans = [micro_batches(share, size, max(shares)) for share in shares]
                assert len({len(s) for s in spans}) == 1, "ranks must issue the same FSDP collectives"
                for share, rank_spans in zip(shares, spans):
                    assert rank_spans[0][0] == 0 and rank_spans[-1][1] == share
                    assert all(lo <= hi and (size is None or hi - lo <= size) for lo, hi in rank_spans)
                    assert all(a[1] == b[0] for a, b in zip(rank_spans, rank_spans[1:]))


def test_a_preset_sets_the_sizes_that_no_layer_gives(tmp_path):
    from trainer.config import PRESETS

    cfg = parse("--model", "transformer", "--preset", "125m")
    assert {k: getattr(cfg, k) for k in PRESETS["125m"]} == PRESETS["125m"]
    config = tmp_path / "c.yaml"
    config.write_text("preset: small\nseq_len: 100\n")
    cfg = parse("--config", str(config), "--n-layers", "3", environ={"FSDP_TRAIN_D_MODEL": "64"})
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len) == (64, 3, PRESETS["small"]["n_heads"], 100)
    again = parse(*config_to_args(cfg))
    assert again == cfg, "a preset config survives the trip to the workers"


def test_model_args_come_as_json_or_a_yaml_mapping(tmp_path):
    cfg = parse("--model", "pkg.mod:build", "--model-args", '{"depth": 3, "act": "gelu"}')
    assert cfg.model_args == {"depth": 3, "act": "gelu"}
    assert cfg.shape_fields() == {"model": "pkg.mod:build", "model_args": {"depth": 3, "act": "gelu"}}
    config = tmp_path / "c.yaml"
    config.write_text("model: pkg.mod:build\nmodel_args:\n  depth: 5\n")
    assert parse("--config", str(config)).model_args == {"depth": 5}
    assert parse(*config_to_args(cfg)) == cfg
    with pytest.raises(UserError, match="use toy, transformer, hf:CONFIG or package.module:function"):
        parse("--model", "not a spec")


def test_the_vocabulary_comes_from_the_data_unless_given(tmp_path):
    from test_token_data import DOCS, write_texts

    from trainer.data.loader import TrainingData
    from trainer.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions([str(write_texts(tmp_path / "src", DOCS))], tmp_path / "bytes", val_fraction=0.0))
    cfg = resolve_config(build_parser().parse_args(["train", "--model", "transformer", "--data",
                                                    str(tmp_path / "bytes"), "--seq-len", "8"]))
    assert cfg.vocab_size == 257, "the byte tokenizer's 256 bytes and its end-of-document id"
    TrainingData(cfg)  # accepted: before, the default of 256 refused this dataset
    assert "--vocab-size 257" in " ".join(config_to_args(cfg)), "the workers get the resolved vocabulary"
    assert TrainConfig(model="transformer").vocab_size == 256, "synthetic data: 256 ids"
    with pytest.raises(UserError, match="pass --vocab-size 257 or more, or leave it out"):
        TrainingData(TrainConfig(model="transformer", data=str(tmp_path / "bytes"), vocab_size=100, seq_len=8))
