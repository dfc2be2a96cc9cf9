"""A prepared token dataset, addressed by global sample index like the synthetic data.

Sample ``i`` is a window of ``seq_len + 1`` tokens. Epoch ``e = i // windows`` visits every window
once, in the order of a bijection of ``[0, windows)`` keyed by ``(seed, e)``, so the data position
is the one number ``samples_seen``: any world size draws the same samples for the same step,
across epoch boundaries too, and resuming needs no loader state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.errors import UserError

if TYPE_CHECKING:
    import torch

DATASET_FILE = "dataset.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a cheap, well-spread hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class WindowOrder:
    """A seeded bijection of ``[0, n)`` in O(1) memory: a balanced Feistel network on the smallest
    even-bit domain that holds ``n``, walked until it lands inside (on average under 4 steps)."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        self.epoch = epoch
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        self.keys = [_mix64(_mix64(seed * 0x100000001B3 + epoch) + r) for r in range(FEISTEL_ROUNDS)]

    def _permute(self, value: int) -> int:
        left, right = value >> self.half_bits, value & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << self.half_bits) | right

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        value = self._permute(index)
        while value >= self.n:  # cycle walking keeps it a bijection of [0, n)
            value = self._permute(value)
        return value


@dataclass(frozen=True)
class DatasetInfo:
    directory: Path
    dtype: type
    vocab_size: int
    eos_id: int
    tokens: dict[str, int]
    tokenizer: dict[str, Any]
    sha256: dict[str, str]

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records about its data, compared on resume."""
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "tokens": self.tokens}


def same_data(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether two fingerprints (None: synthetic data) name the same token files."""
    return (recorded or {}).get("sha256") == (current or {}).get("sha256")


def open_dataset(directory: str | Path) -> DatasetInfo:
    """Read and check ``dataset.json``; every problem is one line naming the folder and the fix."""
    folder = Path(directory)
    where = f"--data {folder}"
    if not folder.is_dir():
        raise UserError(f"{where}: no such folder; run 'fsdp-train prepare-data INPUT... --out {folder}' first")
    manifest_path = folder / DATASET_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no {DATASET_FILE} (an empty or unprepared folder); run "
                        f"'fsdp-train prepare-data INPUT... --out {folder}'") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: {DATASET_FILE} is unreadable ({exc}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{where}: {DATASET_FILE} has format version {version!r}, this fsdp-train reads "
                        f"{FORMAT_VERSION}; prepare the dataset again with this version")
    try:
        vocab, eos = int(manifest["vocab_size"]), int(manifest["eos_id"])
        dtype = {"uint16": np.uint16, "uint32": np.uint32}[manifest["dtype"]]
        tokens = {split: int(manifest["tokens"][split]) for split in SPLITS}
        sha256 = {str(k): str(v) for k, v in manifest["sha256"].items()}
        tokenizer = dict(manifest["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: {DATASET_FILE} lacks or mangles {exc}; prepare the dataset again") from None
    for split in SPLITS:
        path = folder / f"{split}.bin"
        expected = tokens[split] * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise UserError(f"{where}: {path.name} is missing or not {expected} bytes as {DATASET_FILE} says; "
                            "prepare the dataset again")
    return DatasetInfo(folder, dtype, vocab, eos, tokens, tokenizer, sha256)


class TokenWindows:
    """Training (shuffled, by epoch) or held-out (in order) windows of one split."""

    def __init__(self, info: DatasetInfo, split: str, seq_len: int, seed: int, shuffle: bool) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        count = info.tokens[split]
        self.tokens = (np.memmap(info.directory / f"{split}.bin", dtype=info.dtype, mode="r", shape=(count,))
                       if count else np.zeros(0, dtype=info.dtype))
        self.windows = max(0, (count - 1) // seq_len)
        self._order: WindowOrder | None = None

    def epoch_of(self, index: int) -> int:
        return index // self.windows

    def window(self, index: int) -> int:
        epoch, position = divmod(index, self.windows)
        if not self.shuffle:
            return position
        if self._order is None or self._order.epoch != epoch:
            self._order = WindowOrder(self.windows, self.seed, epoch)
        return self._order[position]

    def batch(self, first_index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for samples ``first_index .. first_index + count - 1``."""
        import torch  # here: prepare-data and the offline tools read datasets without it
        length = self.seq_len + 1
        rows = np.empty((count, length), dtype=np.int64)
        for row, index in enumerate(range(first_index, first_index + count)):
            start = self.window(index) * self.seq_len
            rows[row] = self.tokens[start:start + length]
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]
