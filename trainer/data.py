"""Deterministic synthetic data addressed by global sample index.

Sample ``i`` is a pure function of ``(seed, i)``, so which rank draws it, and how
many ranks there are, never changes what it is. The data is learnable: the toy
task is a fixed random teacher network, the LM task a noisy fixed permutation
chain over the vocabulary, so the loss visibly falls.
"""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.models import TOY_IN, TOY_OUT

LM_NOISE = 0.1  # fraction of tokens drawn at random instead of following the chain


def rank_slice(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """This rank's [start, stop) of the global batch: sizes differ by at most one."""
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % (2**63 - 1))


class SyntheticData:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        rules = _generator(cfg.seed, -1)
        if cfg.model == "toy":
            self.teacher = torch.randn(TOY_OUT, TOY_IN, generator=rules) / TOY_IN**0.5
        else:
            self.successor = torch.randperm(cfg.vocab_size, generator=rules)

    def batch(self, first_index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for samples ``first_index .. first_index + count - 1``."""
        gens = [_generator(self.cfg.seed, i) for i in range(first_index, first_index + count)]
        if self.cfg.model == "toy":
            x = torch.stack([torch.randn(TOY_IN, generator=g) for g in gens]) if gens else torch.empty(0, TOY_IN)
            return x, torch.tanh(2 * x @ self.teacher.T)
        length, vocab = self.cfg.seq_len + 1, self.cfg.vocab_size
        noise = torch.stack([torch.rand(length, generator=g) < LM_NOISE for g in gens])
        random_tokens = torch.stack([torch.randint(vocab, (length,), generator=g) for g in gens])
        tokens = random_tokens.clone()
        for pos in range(1, length):
            follow = self.successor[tokens[:, pos - 1]]
            tokens[:, pos] = torch.where(noise[:, pos], random_tokens[:, pos], follow)
        return tokens[:, :-1], tokens[:, 1:]
