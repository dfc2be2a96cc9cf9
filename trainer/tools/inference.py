"""Use a checkpoint without a process group: rebuild the plain model and run it.

The model is rebuilt from the config recorded in the checkpoint's commit marker,
and its weights are assembled from all shards by ``dcp.load(no_dist=True)``, so a
checkpoint written by any world size loads in one ordinary process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint.layout import COMMIT_FILE, CheckpointInfo, committed_checkpoints, open_checkpoint
from trainer.checkpoint.reader import read_model_weights
from trainer.config import TrainConfig, config_from_record
from trainer.data.dataset import open_dataset
from trainer.data.tokenizer import Tokenizer, dataset_tokenizer, open_tokenizer
from trainer.errors import UserError
from trainer.models.build import build_model, logits_of
from trainer.models.toy import TOY_IN


def open_for_inference(path: str | Path) -> CheckpointInfo:
    """CKPT: a committed checkpoint, or a run's --checkpoint-dir (its newest committed checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / COMMIT_FILE).exists() and (committed := committed_checkpoints(path)):
        return committed[-1]
    return open_checkpoint(path)


def load_model(checkpoint: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The unwrapped model with the checkpoint's weights, in eval mode, plus its training config."""
    info = open_for_inference(checkpoint)
    cfg = config_from_record(info.marker.config, f"{info.path / COMMIT_FILE} config")
    model = build_model(cfg)
    model.load_state_dict(read_model_weights(info.path))
    return model.eval(), cfg


def parse_input(cfg: TrainConfig, text: str) -> torch.Tensor:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--input {text!r}: expected numbers separated by commas or spaces") from None
    if cfg.model == "toy":
        if len(values) != TOY_IN:
            raise UserError(f"--input: the toy model takes {TOY_IN} numbers, got {len(values)}")
        return torch.tensor([values], dtype=torch.float32)
    tokens = [int(v) for v in values]
    if not tokens or any(t < 0 or t >= cfg.vocab_size for t in tokens) or len(tokens) > cfg.seq_len:
        raise UserError(f"--input: give 1..{cfg.seq_len} token ids in [0, {cfg.vocab_size})")
    return torch.tensor([tokens], dtype=torch.long)


def run_tokenizer(cfg: TrainConfig, override: str | None) -> Tokenizer:
    """``--tokenizer``, else the one the run's dataset recorded (synthetic runs have none)."""
    if override is not None:
        return open_tokenizer(override)
    if cfg.data is None:
        raise UserError("--prompt: this checkpoint was trained on synthetic token ids, not text; pass --input IDS")
    info = open_dataset(cfg.data)
    return dataset_tokenizer(info.directory, info.tokenizer)


def encode_prompt(cfg: TrainConfig, tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer.encode_batch([prompt])[0].tolist()
    if not ids or max(ids) >= cfg.vocab_size:
        raise UserError(f"--prompt {prompt!r}: encodes to no tokens or to ids beyond the model's vocabulary "
                        f"({cfg.vocab_size}); pass a non-empty prompt and the run's own tokenizer")
    return torch.tensor([ids[-cfg.seq_len:]], dtype=torch.long)


@torch.no_grad()
def run(model: nn.Module, cfg: TrainConfig, inputs: torch.Tensor, generate: int = 0, temperature: float = 0.0,
        seed: int = 0) -> list:
    """Toy: the 8 outputs. Transformer: the next ``generate`` tokens (at least one), greedy at
    temperature 0, else sampled (seeded)."""
    if cfg.model == "toy":
        return [round(v, 6) for v in model(inputs)[0].tolist()]
    generator = torch.Generator().manual_seed(seed)
    tokens = inputs
    for _ in range(max(1, generate)):
        logits = logits_of(model(tokens[:, -cfg.seq_len:]), cfg.model)[:, -1]
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        else:
            next_token = logits.argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, inputs.shape[1]:].tolist()
