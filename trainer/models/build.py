"""Which model a config names, built the same on every rank, and the loss it trains with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import TrainConfig
from trainer.models.plugins import build_plugin
from trainer.models.toy import ToyModel
from trainer.models.transformer import TransformerLM


def build_model(cfg: TrainConfig) -> nn.Module:
    """Build the unwrapped model, initialised from ``cfg.seed`` identically on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model == "toy":
            return ToyModel()
        if cfg.model == "transformer":
            return TransformerLM(cfg)
        return build_plugin(cfg.model, cfg.model_args, cfg.python_path)


def per_sample_loss(model_kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of each sample (shape ``[batch]``), so ranks can weight by sample count."""
    output = output.float()  # a bf16 forward still takes its loss in fp32
    if model_kind == "toy":
        return F.mse_loss(output, target, reduction="none").mean(dim=1)
    tokens = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none")
    return tokens.view(target.shape).mean(dim=1)
