"""A DCP ``FileSystemReader`` that reads only the rows a rank needs, straight into its shard.

The stock reader ``torch.load``s every saved item a rank's shard overlaps, then narrows
and copies it. When the world size changes, a rank's new shard usually straddles two
saved shards, so it reads both in full: at 2 -> 3 ranks the middle rank reads the whole
state, three times its share, and copies each byte three times.

Each saved item is a small uncompressed ``torch.save`` zip whose tensor bytes are one
stored record. For a contiguous saved tensor the rows ``[a, b)`` of dim 0 are one byte
range of that record, so this reader locates the record from the zip directory and the
tensor's layout from its (tiny) pickle, and ``readinto`` the destination rows directly:
one copy, only the bytes needed. Anything it does not recognise (other layouts, byte
items, stream transforms) goes through the stock path, so it reads any DCP checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem


class TensorLayout(NamedTuple):
    """Where a saved tensor's elements start in the checkpoint file, and how they are laid out."""
    data_start: int  # byte offset in the .distcp file of the tensor's first element
    data_end: int  # byte offset just past its storage record
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _NotRecognised(Exception):
    """This item is not a plain saved tensor; the stock reader handles it."""


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


class _ItemView(io.RawIOBase):
    """Read-only window ``[offset, offset + length)`` of a file, seekable with the usual semantics."""

    def __init__(self, raw: Any, offset: int, length: int) -> None:
        super().__init__()
        self._raw, self._start, self._length, self._position = raw, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._position)
        self._raw.seek(self._start + self._position)
        got = self._raw.readinto(memoryview(buffer)[:count]) if count > 0 else 0
        self._position += got
        return got


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` pickle of one tensor without building it: storage offset, size, stride."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise _NotRecognised(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid  # ('storage', type name, key, location, numel)


def _record_start(item_view: Any, record: zipfile.ZipInfo) -> int:
    """Offset in the item of a stored zip record's first byte (past its local header)."""
    item_view.seek(record.header_offset)
    local_header = item_view.read(30)  # fixed part of a zip local file header
    return record.header_offset + 30 + int.from_bytes(local_header[26:28], "little") \
        + int.from_bytes(local_header[28:30], "little")


def _stored_bytes(item_view: Any, record: zipfile.ZipInfo) -> bytes:
    """A small stored record's bytes. Read directly: this project's writer skips zip CRCs
    (its own file checksum covers every byte), which ``ZipFile.read`` would reject."""
    item_view.seek(_record_start(item_view, record))
    return item_view.read(record.file_size)


def read_layout(stream: Any, item_offset: int, item_length: int) -> TensorLayout:
    """Parse the saved item at ``[item_offset, +item_length)`` of a checkpoint file down to its tensor layout."""
    item_view = io.BufferedReader(_ItemView(stream, item_offset, item_length))
    try:
        with zipfile.ZipFile(item_view) as archive:
            records = {info.filename: info for info in archive.infolist()}
        pickle_name = next(name for name in records if name.endswith("/data.pkl"))
        prefix = pickle_name.removesuffix("data.pkl")
        if any(info.compress_type != zipfile.ZIP_STORED for info in records.values()) or \
                _stored_bytes(item_view, records[prefix + "byteorder"]) != b"little":
            raise _NotRecognised("compressed or big-endian")
        pickled = _stored_bytes(item_view, records[pickle_name])
        storage, storage_offset, size, stride = _LayoutUnpickler(io.BytesIO(pickled)).load()
        record = records[f"{prefix}data/{storage[2]}"]
    except (zipfile.BadZipFile, KeyError, StopIteration, ValueError, TypeError, IndexError,
            pickle.UnpicklingError) as exc:
        raise _NotRecognised(str(exc)) from None
    if stride != _contiguous_strides(size):
        raise _NotRecognised("non-contiguous")
    element_bytes = record.file_size // max(int(storage[4]), 1)
    data_start = item_offset + _record_start(item_view, record)
    return TensorLayout(data_start + storage_offset * element_bytes, data_start + record.file_size, size, stride)


class RangeReader(FileSystemReader):
    """Reads tensors by row range (see the module docstring); everything else as ``FileSystemReader`` does.

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
            layout = read_layout(stream, stored.offset, stored.length)
        except _NotRecognised:
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
        destination = target if target.is_contiguous() else torch.empty_like(target, memory_format=torch.contiguous_format)
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
