"""The seed's model: ``Linear 16->16, ReLU, Linear 16->8`` (FQNs ``net1``/``net2``), trained by
regression on a fixed random teacher. Checkpoints of a few KB, so tests and benches of the
checkpoint path run in seconds."""

from __future__ import annotations

import torch
from torch import nn

TOY_IN, TOY_HIDDEN, TOY_OUT = 16, 16, 8


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(TOY_IN, TOY_HIDDEN)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(TOY_HIDDEN, TOY_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))

    def shard_units(self) -> list[nn.Module]:
        return [self.net1, self.net2]
