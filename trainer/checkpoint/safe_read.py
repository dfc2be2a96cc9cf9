"""Read a checkpoint as data: nothing in a checkpoint directory can make a reader run code.

A checkpoint may come from anywhere (downloaded, copied between clusters, written by someone
else), so every path that opens one goes through here:
- ``.metadata`` is unpickled with an allow-list of DCP's metadata types (``torch_compat``), after
  its checksum is compared with ``commit.json`` when the caller has one;
- every file the metadata names must lie inside the checkpoint directory;
- bytes items are loaded with ``torch.load(weights_only=True)``; tensors already are, by DCP.
Whatever is refused stops the reader with ``UnsafeCheckpoint``: one line naming the file and what it
refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from trainer.checkpoint import integrity
from trainer.checkpoint.torch_compat import RefusedType, load_dcp_metadata
from trainer.errors import UserError

METADATA_FILE = ".metadata"


class UnsafeCheckpoint(UserError):
    """A checkpoint asked for something a reader must never do: run code, or read outside itself."""


class DamagedMetadata(UserError):
    """``.metadata`` differs from what ``commit.json`` recorded for it."""


def check_confined(root: Path, metadata: Metadata) -> None:
    """Refuse metadata that names a file outside ``root``: an absolute path, ``..``, or a symlink
    that leads out."""
    inside = root.resolve()
    for relative in sorted({info.relative_path for info in metadata.storage_data.values()}):
        name = PurePath(relative)
        target = (root / relative).resolve()
        if name.is_absolute() or ".." in name.parts or (target != inside and inside not in target.parents):
            raise UnsafeCheckpoint(f"{root / METADATA_FILE}: names the file {relative!r}, which is outside the "
                                   "checkpoint directory; refusing to read it")


def read_metadata(root: str | Path, recorded: dict[str, Any] | None = None) -> Metadata:
    """The checkpoint's DCP metadata, read as data. With ``recorded`` (the file's entry in
    ``commit.json``) the bytes are verified first, and the bytes verified are the bytes unpickled."""
    root = Path(root)
    path = root / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror}); is {root} a DCP checkpoint?") from None
    if recorded is not None:
        problem = integrity.bytes_problem(path, data, recorded)
        if problem:
            raise DamagedMetadata(problem)
    try:
        metadata = load_dcp_metadata(data)
    except RefusedType as refused:
        raise UnsafeCheckpoint(f"{path}: refused to unpickle {refused} (DCP metadata holds only DCP's own "
                               "types); this checkpoint is not safe to open") from None
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; the checkpoint is damaged") from None
    check_confined(root, metadata)
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` that reads the metadata as data and only files inside the checkpoint.

    The metadata is read and checked when the reader is made, so a refusal is raised by the caller's
    own code, in one line, not from inside ``dcp.load`` (which would turn it into a traceback).
    ``recorded_metadata``: ``.metadata``'s entry in ``commit.json``, to verify it before unpickling.
    """

    def __init__(self, path: str | Path, recorded_metadata: dict[str, Any] | None = None) -> None:
        super().__init__(path)
        self.metadata = read_metadata(Path(self.path), recorded_metadata)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata, which we never write
            raise UserError(f"{self.path}: has no per-rank metadata")
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if metadata is not self.metadata:  # ours was checked when read; metadata from elsewhere is checked here
            check_confined(Path(self.path), metadata)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)


def load_weights_only(stream: Any, what: str) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers and scalars; any other type refused."""
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = str(exc).strip().splitlines()
        detail = next((line for line in refused if "GLOBAL" in line or "Unsupported" in line), refused[0] if refused
                      else "a type outside torch's weights-only allow-list")
        raise UnsafeCheckpoint(f"{what}: refused to unpickle it ({detail.strip()}); this checkpoint is not safe "
                               "to open") from None


def assign(root: Any, path: tuple, value: Any) -> None:
    """Set ``value`` at ``path`` (string keys for dicts, ints for lists) in a nested state dict,
    creating what is missing: where DCP's planner puts a loaded item."""
    container = root
    for key, following in zip(path, path[1:]):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(container, dict):
            container = container.setdefault(key, empty)
        else:
            container.extend([None] * (key + 1 - len(container)))
            if container[key] is None:
                container[key] = empty
            container = container[key]
    if isinstance(path[-1], int):
        container.extend([None] * (path[-1] + 1 - len(container)))
    container[path[-1]] = value


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but a bytes item is loaded with ``weights_only=True`` (DCP's own uses
    ``weights_only=False``, which runs any code a crafted item holds)."""

    def __init__(self, source: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_weights_only(value, f"{self._source}: item {fqn!r}")
        if self.flatten_state_dict:
            assign(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded
