"""A DCP ``FileSystemReader`` that reads only the rows a rank needs, straight into its shard.

The stock reader ``torch.load``s every saved item a rank's shard overlaps, then narrows
and copies it. When the world size changes, a rank's new shard usually straddles two
saved shards, so it reads both in full: at 2 -> 3 ranks the middle rank reads the whole
state, three times its share, and copies each byte three times.

Each saved item is a small uncompressed ``torch.save`` zip whose tensor bytes are one
stored record. For a contiguous saved tensor the rows ``[a, b)`` of dim 0 are one byte
range of that record, so this reader locates the record and the tensor's layout from the
item's zip directory and (tiny) pickle (``torch_compat.saved_tensor_layout``), and ``readinto``
the destination rows directly: one copy, only the bytes needed. Anything it does not recognise (other layouts, byte
items, stream transforms) goes through the stock path, so it reads any DCP checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from trainer.checkpoint import torch_compat
from trainer.checkpoint.safe_read import SafeReader
from trainer.checkpoint.torch_compat import NotAPlainTensor, saved_tensor_layout


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def new_storage_reader(path: str | Path, recorded_metadata: dict[str, Any] | None = None) -> SafeReader:
    """The reader a resume uses: this one, or DCP's own read loop where torch is outside the tested
    range; either reads the checkpoint as data (``safe_read``)."""
    reader = RangeReader if torch_compat.fast_paths() else SafeReader
    return reader(path, recorded_metadata)


class RangeReader(SafeReader):
    """Reads tensors by row range (see the module docstring); everything else as ``SafeReader`` does.

    ``whole_items`` lists the tensors this rank left to the stock path (none, for checkpoints we wrote).
    """

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._metadata = metadata
        self.whole_items: list[str] = []

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        leftover: list[ReadItem] = []
        for relative_path, items in per_file.items():
            with Path(self.path, relative_path).open("rb", buffering=0) as stream:
                leftover += [item for item in items if not self._read_rows(stream, item, planner)]
        self.whole_items = [item.storage_index.fqn for item in leftover if item.type == LoadItemType.TENSOR]
        return super().read_data(dataclasses.replace(plan, items=leftover), planner)

    def _read_rows(self, stream: Any, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read one tensor item's needed rows into place; False when the stock path must do it."""
        stored = self.storage_data[item.storage_index]
        entry = self._metadata.state_dict_metadata.get(item.storage_index.fqn)
        if item.type != LoadItemType.TENSOR or stored.transform_descriptors or \
                not isinstance(entry, TensorStorageMetadata):
            return False
        try:
            layout = saved_tensor_layout(stream, stored.offset, stored.length)
        except NotAPlainTensor:
            return False
        if layout.stride != _contiguous_strides(layout.size):
            return False
        target = planner.resolve_tensor(item).detach()
        whole_rows = all(offset == 0 and length == layout.size[dim]
                         for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths)) if dim > 0)
        if target.dtype != entry.properties.dtype or not whole_rows or tuple(target.shape) != tuple(item.lengths):
            return False
        first_element = item.storage_offsets[0] * layout.stride[0] if layout.size else 0
        start = layout.data_start + first_element * target.element_size()
        if start + target.numel() * target.element_size() > layout.data_end:
            return False
        destination = target if target.is_contiguous() else \
            torch.empty_like(target, memory_format=torch.contiguous_format)
        buffer = memoryview(destination.reshape(-1).view(torch.uint8).numpy()).cast("B")
        stream.seek(start)
        filled = 0
        while filled < len(buffer):
            count = stream.readinto(buffer[filled:])
            if not count:
                raise OSError(f"{Path(self.path, stored.relative_path)}: ends inside a saved tensor (truncated)")
            filled += count
        if destination is not target:
            target.copy_(destination)
        planner.commit_tensor(item, target)
        return True
