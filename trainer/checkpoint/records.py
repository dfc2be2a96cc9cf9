"""Each tensor item's ``torch.save`` record, resolved once and reused while its tensor stays put.

An async save writes the same staging buffers every time, and the planner keeps one plan while
the layout holds, so each write item names the same tensor, with the same frame, save after
save. Resolving the item and looking up its frame costs about 20 us of Python per tensor, on a
CPU that training needs; here it is done once, and a later save only checks that the item still
names the same tensor object over the same storage, then writes the cached frame and a view of
the tensor's current bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem
from torch.distributed.tensor import DTensor

from trainer.checkpoint.frames import TorchSaveFrames


@dataclass
class _Record:
    source: Any  # the state dict's value the item named
    local: torch.Tensor  # the tensor written (a DTensor's shard)
    address: int  # where its bytes were
    alignment: int
    pieces: list[Any]

    def still_valid(self, source: Any, local: torch.Tensor | None, alignment: int | None) -> bool:
        return (source is self.source and local is self.local and alignment == self.alignment
                and local.data_ptr() == self.address)


def _local_tensor(source: Any) -> torch.Tensor | None:
    """The tensor a state-dict value is written as, when that needs no planner logic; else None."""
    if isinstance(source, DTensor):
        local = source._local_tensor
        return local if type(local) is torch.Tensor else None
    return source if type(source) is torch.Tensor else None


class TensorRecords:
    """Per-process cache: ``torch.save`` frames per tensor layout, and each tensor item's record."""

    def __init__(self) -> None:
        self.frames = TorchSaveFrames()
        self._records: dict[tuple, _Record] = {}

    def pieces(self, planner: SavePlanner, item: WriteItem, alignment: int | None) -> list[Any]:
        """The buffers of ``item``'s record, in order (its tensor as ``torch.save`` writes it)."""
        key = (item.index.fqn, item.index.offset)
        source = local = None
        if type(planner).resolve_data is DefaultSavePlanner.resolve_data:  # no custom transform to run
            source = planner.state_dict.get(item.index.fqn)
            local = _local_tensor(source)
        record = self._records.get(key)
        if record is not None and record.still_valid(source, local, alignment):
            return record.pieces
        tensor = planner.resolve_data(item).detach().cpu()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a record holds only the tensor's own bytes, as in DCP's writer
            local = None
        pieces, framed = self.frames.pieces(tensor, alignment)
        if framed and local is not None and tensor.data_ptr() == local.data_ptr():
            self._records[key] = _Record(source, local, local.data_ptr(), alignment, pieces)
        else:
            self._records.pop(key, None)
        return pieces

    def keep_only(self, keys: set[tuple]) -> None:
        """Forget items the last save did not write, so no stale tensor is kept alive."""
        self._records = {key: record for key, record in self._records.items() if key in keys}
