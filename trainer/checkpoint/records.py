"""Each write item's ``torch.save`` record, made once and reused while its value stays the same.

An async save writes the same staging buffers every time, and the planner keeps one plan while
the layout holds, so each tensor item names the same tensor, with the same frame, save after
save. Resolving the item and looking up its frame is Python work per tensor, on a CPU that
training needs; here it is done once, and a later save only checks that the item still
names the same tensor object over the same storage, then writes the cached frame and a view of
the tensor's current bytes. Most byte items (hyperparameters, the parameter list) never change:
their ``torch.save`` output is kept and reused while the value pickles to the same bytes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from trainer.checkpoint.frames import TorchSaveFrames
from trainer.checkpoint.staging import SCALAR_TYPES
from trainer.checkpoint.torch_compat import local_shard


@dataclass
class _TensorRecord:
    source: Any  # the state dict's value the item named
    local: torch.Tensor  # the tensor written (a DTensor's shard)
    address: int  # where its bytes were
    alignment: int
    pieces: list[memoryview]

    def still_valid(self, source: Any, local: torch.Tensor | None, alignment: int | None) -> bool:
        return (source is self.source and local is self.local and alignment == self.alignment
                and local.data_ptr() == self.address)


def _local_tensor(source: Any) -> torch.Tensor | None:
    """The tensor a state-dict value is written as, when that needs no planner logic; else None."""
    if isinstance(source, DTensor):
        local = local_shard(source)
        return local if type(local) is torch.Tensor else None
    return source if type(source) is torch.Tensor else None


def _plain(value: Any) -> bool:
    """Scalars and lists, tuples and dicts of them: values whose pickle says exactly what they are."""
    if isinstance(value, SCALAR_TYPES):
        return True
    if type(value) in (list, tuple):
        return all(_plain(item) for item in value)
    return type(value) is dict and all(_plain(key) and _plain(item) for key, item in value.items())


class ItemRecords:
    """Per-process cache of write items' records: frames per tensor layout, each item's record."""

    def __init__(self) -> None:
        self.frames = TorchSaveFrames()
        self._tensors: dict[tuple, _TensorRecord] = {}
        self._bytes: dict[tuple, tuple[bytes, bytes]] = {}  # key -> (the value's pickle, its record)

    def pieces(self, planner: SavePlanner, item: WriteItem, alignment: int | None) -> list[memoryview]:
        """The byte views of ``item``'s record, in order: what DCP's writer would write for it."""
        source = None
        if type(planner).resolve_data is DefaultSavePlanner.resolve_data:  # no custom transform to run
            source = planner.state_dict.get(item.index.fqn)
        key = (item.index.fqn, item.index.offset, alignment)  # CRCs on (no alignment) change the bytes
        if item.type == WriteItemType.BYTE_IO:
            return [memoryview(self._byte_record(planner, item, key, source))]
        return self._tensor_pieces(planner, item, key, source, alignment)

    def _byte_record(self, planner: SavePlanner, item: WriteItem, key: tuple, source: Any) -> bytes:
        value_pickle = pickle.dumps(source) if source is not None and _plain(source) else None
        cached = self._bytes.get(key)
        if value_pickle is not None and cached is not None and cached[0] == value_pickle:
            return cached[1]
        record = planner.resolve_data(item).getvalue()
        if value_pickle is not None:
            self._bytes[key] = (value_pickle, record)
        return record

    def _tensor_pieces(self, planner: SavePlanner, item: WriteItem, key: tuple, source: Any,
                       alignment: int | None) -> list[memoryview]:
        local = _local_tensor(source)
        record = self._tensors.get(key)
        if record is not None and record.still_valid(source, local, alignment):
            return record.pieces
        tensor = planner.resolve_data(item).detach().cpu()
        pieces, framed = self.frames.pieces(tensor, alignment)  # a view's own bytes only, as in DCP's writer
        if framed and local is not None and tensor.data_ptr() == local.data_ptr():
            self._tensors[key] = _TensorRecord(source, local, local.data_ptr(), alignment, pieces)
        else:
            self._tensors.pop(key, None)
        return pieces

    def keep_only(self, fqns: set[str]) -> None:
        """Forget items the last save did not write, so no stale tensor is kept alive."""
        self._tensors = {key: record for key, record in self._tensors.items() if key[0] in fqns}
        self._bytes = {key: record for key, record in self._bytes.items() if key[0] in fqns}
