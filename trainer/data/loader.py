"""The training data, addressed by global sample index, and the loader that fetches it ahead.

Sample ``i`` is a pure function of ``(seed, i)`` and the data, so which rank draws it, and how
many ranks there are, never changes what it is. Without ``--data`` the data is synthetic and
learnable: the toy task is a fixed random teacher network, the LM task a noisy fixed
permutation chain over the vocabulary, so the loss visibly falls. With ``--data`` it is a
prepared token dataset (``token_data``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from trainer.config import TrainConfig
from trainer.data.dataset import DatasetInfo, TokenWindows, open_dataset, same_data
from trainer.errors import UserError
from trainer.models.toy import TOY_IN, TOY_OUT

LM_NOISE = 0.1  # fraction of tokens drawn at random instead of following the chain
HELD_OUT_SYNTHETIC = 1 << 48  # synthetic evaluation samples start here: never reached by training


class Samples(Protocol):
    def batch(self, first_index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]: ...


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


class Prefetcher:
    """Fetches the next step's batch on a background thread while this step trains (the slicing
    and copying release the GIL)."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._ahead: tuple[tuple[int, int], Future] | None = None

    def batch(self, first_index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch, from the prefetch when it was this one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (first_index, count):
            return ahead[1].result()
        return self.samples.batch(first_index, count)

    def fetch_ahead(self, first_index: int, count: int) -> None:
        self._ahead = ((first_index, count), self._pool.submit(self.samples.batch, first_index, count))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TrainingData:
    """What a run trains and evaluates on: the synthetic task, or ``--data``'s token windows."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.info: DatasetInfo | None = None
        if cfg.data is None:
            synthetic = SyntheticData(cfg)
            self.train: Samples = synthetic
            self.held_out: Samples | None = _Offset(synthetic, HELD_OUT_SYNTHETIC)
            self.windows: int | None = None
            return
        if cfg.model == "toy":
            raise UserError(f"--data {cfg.data}: the toy model takes no token data; pass --model transformer")
        info = self.info = open_dataset(cfg.data)
        if info.vocab_size > cfg.vocab_size:
            raise UserError(f"--data {cfg.data}: its vocabulary ({info.vocab_size} ids) is larger than the model's "
                            f"--vocab-size {cfg.vocab_size}; pass --vocab-size {info.vocab_size} or more, or leave it "
                            "out to take the data's")
        train = TokenWindows(info, "train", cfg.seq_len, cfg.seed, shuffle=True)
        if train.windows < cfg.global_batch_size:
            raise UserError(f"--data {cfg.data}: {train.windows} training windows of {cfg.seq_len + 1} tokens, fewer "
                            f"than one global batch ({cfg.global_batch_size}); add data or lower --global-batch-size "
                            "or --seq-len")
        held_out = TokenWindows(info, "val", cfg.seq_len, cfg.seed, shuffle=False)
        if cfg.eval_every and held_out.windows == 0:
            raise UserError(f"--eval-every {cfg.eval_every}: --data {cfg.data} holds out no full window; prepare it "
                            "with more documents or a larger --val-fraction, or drop --eval-every")
        self.train, self.held_out, self.windows = train, held_out if held_out.windows else None, train.windows

    def position(self, samples_seen: int) -> dict[str, int]:
        """Where the run is in the data, for the step records."""
        if self.windows is None:
            return {}
        return {"epoch": samples_seen // self.windows, "tokens_seen": samples_seen * self.cfg.seq_len}


class _Offset:
    """Samples ``offset + i``: the synthetic held-out set, far beyond any training index."""

    def __init__(self, samples: Samples, offset: int) -> None:
        self.samples, self.offset = samples, offset

    def batch(self, first_index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples.batch(self.offset + first_index, count)


def check_same_data(cfg: TrainConfig, recorded: dict[str, Any] | None,
                    current: dict[str, Any] | None) -> None:
    """Refuse, in one line, to resume on other data, unless asked to."""
    if cfg.allow_data_change or same_data(recorded, current):
        return
    was = "synthetic data" if recorded is None else "another dataset"
    raise UserError(f"--data {cfg.data or '(none: synthetic)'}: the checkpoint was trained on {was} (its token files' "
                    "checksums differ); pass the same data, or --allow-data-change to switch deliberately")
