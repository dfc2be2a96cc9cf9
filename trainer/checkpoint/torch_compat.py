"""Every use of torch internals in the checkpoint engine, in one place.

The fast save and load paths lean on things torch does not promise: private names, the
exact bytes ``torch.save`` writes, how DCP's plan cache and write loop behave. Each such
assumption is a function or constant here, and ``tests/test_torch_compat.py`` has one test
per assumption, named after it. A torch upgrade that breaks one fails that test, not a save.

Outside ``TESTED_TORCH``, ``fast_paths()`` is False (with one warning) and the engine uses
DCP's stock writer, planner and reader, which need none of this module's private names.
"""

from __future__ import annotations

import collections
import enum
import functools
import io
import pathlib
import pickle
import queue
import warnings
import zipfile
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.tensor import DTensor

TESTED_TORCH = ((2, 13), (2, 13))  # (major, minor), inclusive: the releases the tests below ran on

StorageInfo = _StorageInfo  # where DCP's metadata says an item lives: (relative path, offset, length)


# ---- the version gate -------------------------------------------------------------------------
def torch_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``2.13.0+cpu``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def fast_paths_supported(version: str) -> bool:
    low, high = TESTED_TORCH
    return low <= torch_release(version) <= high


@functools.cache
def fast_paths() -> bool:
    """Whether this torch is one the fast paths were tested on; warns once when it is not."""
    if fast_paths_supported(torch.__version__):
        return True
    low, high = (".".join(map(str, release)) for release in TESTED_TORCH)
    warnings.warn(f"torch {torch.__version__} is outside the range the checkpoint fast paths were tested on "
                  f"({low} to {high}): using DCP's stock writer, planner and reader instead", RuntimeWarning,
                  stacklevel=2)
    return False


# ---- DTensor ----------------------------------------------------------------------------------
def local_shard(value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (the very tensor object it holds), any
    other tensor itself. Caches key on that object's identity, so it must not be a fresh view."""
    if isinstance(value, DTensor):
        with torch.no_grad():  # with grad on, to_local returns a new autograd view each call
            return value.to_local()
    return value


def copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for all i, in one fused call where torch has it."""
    if fast_paths():
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources):
        target.copy_(source)


# ---- DCP's save planner and write loop ---------------------------------------------------------
def accepted_local_plan(planner: SavePlanner) -> SavePlan | None:
    """The local plan DCP's plan cache holds for this planner (``enable_plan_caching``): the one the
    last successful save used, which DCP reuses when the new local plan is unchanged."""
    return SavePlanner._cached_save_plan.get(planner._cached_plans_key)


class WriteLoopWriter(FileSystemWriter):
    """A ``FileSystemWriter`` whose per-file write loop is the public-named ``write_files``.

    DCP's ``write_data`` builds the queue of (path, storage key, items) per file and hands it to
    its private ``_write_data``; subclasses override ``write_files`` instead.
    """

    def _write_data(self, planner: SavePlanner, file_queue: queue.Queue) -> Any:
        return self.write_files(planner, file_queue)

    def write_files(self, planner: SavePlanner, file_queue: queue.Queue) -> Any:
        return super()._write_data(planner, file_queue)


# ---- torch.save's output -----------------------------------------------------------------------
Frame = tuple[bytes, bytes]  # what torch.save writes before and after a tensor's storage bytes


def storage_alignment() -> int:
    """The alignment ``torch.save`` pads each storage record to (part of every frame)."""
    return torch.serialization._get_storage_alignment()


def _address(buffer: Any) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


class _FrameRecorder:
    """File-like target for one real ``torch.save``: keeps every write, and where the storage went."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self._storage = (storage.data_ptr(), storage.nbytes())
        self.parts: list[bytes] = []
        self._payload_at: list[int] = []

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if (_address(view), len(view)) == self._storage:
            self._payload_at.append(len(self.parts))
        self.parts.append(bytes(view))
        return len(view)

    def flush(self) -> None:
        pass


def record_torch_save(tensor: torch.Tensor) -> tuple[Frame | None, list[bytes]]:
    """Run ``torch.save(tensor)`` and split its output around the storage bytes.

    Relies on ``torch.save`` (zip CRCs off) handing the storage to the file as exactly one write
    of the storage's own memory. Returns the frame, or None when that did not happen, and
    every part written, in order.
    """
    recorder = _FrameRecorder(tensor.untyped_storage())
    torch.save(tensor, recorder)
    if len(recorder._payload_at) != 1:
        return None, recorder.parts
    split = recorder._payload_at[0]
    return (b"".join(recorder.parts[:split]), b"".join(recorder.parts[split + 1:])), recorder.parts


REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")  # what a torch.save pickle calls to rebuild a tensor


class NotAPlainTensor(Exception):
    """A saved item that is not one plain tensor in an uncompressed ``torch.save`` zip."""


class SavedTensorLayout(NamedTuple):
    """Where a saved tensor's elements lie in a checkpoint file, and how they are laid out."""

    data_start: int  # file offset of the tensor's first element
    data_end: int  # file offset just past its storage record
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` pickle of one tensor without building it: storage, offset, size, stride."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == REBUILD_TENSOR:
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise NotAPlainTensor(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid  # ('storage', type name, key, location, numel)


class _Window(io.RawIOBase):
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


def _record_start(item: Any, record: zipfile.ZipInfo) -> int:
    """Offset in the item of a stored zip record's first byte (past its local header)."""
    item.seek(record.header_offset)
    local_header = item.read(30)  # the fixed part of a zip local file header
    return record.header_offset + 30 + int.from_bytes(local_header[26:28], "little") \
        + int.from_bytes(local_header[28:30], "little")


def _stored_bytes(item: Any, record: zipfile.ZipInfo) -> bytes:
    """A small stored record's bytes, read directly: ``ZipFile.read`` would check the zip CRC,
    which this project's writer leaves out (its own checksums cover every byte)."""
    item.seek(_record_start(item, record))
    return item.read(record.file_size)


def saved_tensor_layout(stream: Any, item_offset: int, item_length: int) -> SavedTensorLayout:
    """Parse the ``torch.save`` zip at ``[item_offset, +item_length)`` of ``stream`` down to its tensor's layout.

    Relies on the archive holding ``<prefix>/data.pkl``, ``<prefix>/byteorder`` and one stored
    record ``<prefix>/data/<key>`` per storage. Raises ``NotAPlainTensor`` for anything else.
    """
    item = io.BufferedReader(_Window(stream, item_offset, item_length))
    try:
        with zipfile.ZipFile(item) as archive:
            records = {info.filename: info for info in archive.infolist()}
        pickle_name = next(name for name in records if name.endswith("/data.pkl"))
        prefix = pickle_name.removesuffix("data.pkl")
        if any(info.compress_type != zipfile.ZIP_STORED for info in records.values()) or \
                _stored_bytes(item, records[prefix + "byteorder"]) != b"little":
            raise NotAPlainTensor("compressed or big-endian")
        pickled = _stored_bytes(item, records[pickle_name])
        storage, storage_offset, size, stride = _LayoutUnpickler(io.BytesIO(pickled)).load()
        record = records[f"{prefix}data/{storage[2]}"]
    except (zipfile.BadZipFile, KeyError, StopIteration, ValueError, TypeError, IndexError,
            pickle.UnpicklingError) as exc:
        raise NotAPlainTensor(str(exc)) from None
    element_bytes = record.file_size // max(int(storage[4]), 1)
    data_start = item_offset + _record_start(item, record)
    return SavedTensorLayout(data_start + storage_offset * element_bytes, data_start + record.file_size, size, stride)


# ---- DCP's metadata pickle ---------------------------------------------------------------------
# DCP writes ``.metadata`` with ``pickle.dump`` and its own reader runs ``pickle.load`` on it, which
# would run whatever a crafted file asks for. ``load_dcp_metadata`` admits only the types DCP's
# metadata is made of (and plain containers and scalars, which need no lookup), each named here
# with why it is needed.
METADATA_TYPES: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", "Metadata"): dcp_metadata.Metadata,  # the root object
    # one per state-dict entry: a tensor's global size, properties and chunks, or a bytes item
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): dcp_metadata.TensorStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"): dcp_metadata.BytesStorageMetadata,
    # each saved shard of a tensor: its offsets and sizes
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): dcp_metadata.ChunkStorageMetadata,
    # a tensor's dtype, layout, requires_grad, memory format and pin_memory
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): dcp_metadata.TensorProperties,
    # TensorProperties pickles its memory format as a member of this enum (by value, or by name
    # through ``getattr``, which ``_enum_member`` stands in for)
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    # the keys of storage_data: (fqn, offset, index)
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): dcp_metadata.MetadataIndex,
    # the checkpoint id and the save and load ids
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): dcp_metadata.StorageMeta,
    # the values of storage_data: which file an item is in, at what offset, how long
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,  # tensor and chunk sizes
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # how torch.strided pickles
    # StorageMeta.checkpoint_id, when the checkpoint was saved to a path object
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,  # mappings in metadata older DCP wrote
}


class RefusedType(Exception):
    """A pickle asked for a type outside the allow-list; the message is the type's dotted name."""


def _enum_member(cls: Any, name: Any) -> Any:
    """``getattr`` as a pickle may call it: Python pickles an enum member as ``getattr(EnumClass,
    "MEMBER")`` (3.11.2 here does; 3.11.7 calls the class with the value). Only a member of an
    allow-listed enum is handed out."""
    if cls in METADATA_TYPES.values() and isinstance(cls, enum.EnumMeta) and name in cls.__members__:
        return cls[name]
    raise RefusedType(f"builtins.getattr({getattr(cls, '__name__', type(cls).__name__)}, {name!r})")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = METADATA_TYPES.get((module, name))
        if allowed is not None:
            return allowed
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # TensorProperties.dtype
            return getattr(torch, name)
        raise RefusedType(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedType("a persistent id")


def load_dcp_metadata(data: bytes) -> dcp_metadata.Metadata:
    """DCP's ``Metadata`` from the bytes of a ``.metadata`` file, building nothing outside
    ``METADATA_TYPES``. Raises ``RefusedType``, or ``ValueError`` for anything else that is wrong."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except RefusedType:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or damaged pickles fail in many ways
        raise ValueError(f"not a DCP metadata pickle ({type(exc).__name__})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata
