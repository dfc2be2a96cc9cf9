"""The memory tier: each rank's whole checkpointed state in node-local shared memory, every step.

A snapshot is one rank's local shards (model, optimizer) as raw bytes, plus a JSON manifest of
where each tensor lies and the rest of the state (schedule, progress, hyperparameters) as plain
JSON values: no pickle, nothing that can run code. Each rank keeps two slots; a snapshot writes
the slot that does not hold the newest complete one, and it is complete only once its manifest is
in place, renamed there after the bytes are in. So a kill in the middle of a copy leaves the
previous snapshot intact, and a torn one is never read.

The files live in tmpfs (``/dev/shm``, or the pod's memory ``emptyDir``), in a folder named by the
job (its checkpoint directory) and the run, mode 0700/0600: they outlive the workers, so a restarted
worker restores from them, and the agent that owns the run deletes them when the job ends
(``snapshot_folder``, ``reclaim``). Memory used: two copies of the rank's local state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
SLOTS = 2
ALIGN = 64
FOLDER_ENV = "FSDP_TRAIN_SNAPSHOT_FOLDER"  # set by the agent for its workers: this run's folder
ROOT_ENV = "FSDP_TRAIN_SNAPSHOT_ROOT"  # where the folders go (default /dev/shm/fsdp-train)
SHARED_MEMORY = Path("/dev/shm")
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}


class Unsupported(Exception):
    """The state holds a value a snapshot cannot carry as plain JSON (the tier is then off)."""


# ---- where snapshots live ------------------------------------------------------------------------
def job_key(checkpoint_dir: str | Path) -> str:
    """Names the job on this node: one job per checkpoint directory (the job lock sees to that)."""
    return hashlib.sha256(str(Path(checkpoint_dir).resolve()).encode()).hexdigest()[:16]


def default_root() -> Path:
    """``/dev/shm/fsdp-train`` (tmpfs; in a pod, the memory ``emptyDir``), or the temp folder where
    there is no ``/dev/shm``."""
    return (SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())) / "fsdp-train"


def snapshot_folder(checkpoint_dir: str | Path, run_id: str, root: str | None = None) -> Path:
    """``ROOT/<job key>/<run id>``: the job by its checkpoint directory, then the run."""
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)[:64] or "run"
    return Path(root or os.environ.get(ROOT_ENV) or default_root()) / job_key(checkpoint_dir) / safe_run


def reclaim(folder: Path) -> list[str]:
    """Delete what other runs of the same job left beside ``folder`` (a job killed outright): never
    read, only removed. Returns the runs removed."""
    removed = []
    job = folder.parent
    for other in sorted(job.iterdir()) if job.is_dir() else ():
        if other.name != folder.name:
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other.name)
    return removed


def release(folder: Path) -> None:
    """Free this run's snapshots (the job ended, was stopped, or gave up)."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the job's folder, once no run is left in it
    except OSError:
        pass


# ---- the state as tensors + JSON -------------------------------------------------------------------
def flatten(state: Any) -> tuple[Any, list[torch.Tensor]]:
    """``state`` as a JSON-able structure in which each tensor is ``{"t": index}``, and the tensors
    (DTensors as they are: ``local_shard`` gives their bytes). Containers and scalars are tagged, so
    they come back as they were."""
    tensors: list[torch.Tensor] = []

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return {"t": len(tensors) - 1}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return {"f": repr(value)}  # exact, and inf/nan survive
        if isinstance(value, dict):
            return {"m": [[encode(key), encode(item)] for key, item in value.items()]}
        if type(value) is list:
            return {"l": [encode(item) for item in value]}
        if type(value) is tuple:
            return {"u": [encode(item) for item in value]}
        raise Unsupported(f"a {type(value).__name__} in the state")

    return encode(state), tensors


def unflatten(encoded: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of ``flatten``, with ``tensors[i]`` wherever ``{"t": i}`` stood."""
    if not isinstance(encoded, dict):
        return encoded
    (tag, value), = encoded.items()
    if tag == "t":
        return tensors[value]
    if tag == "f":
        return float(value)
    if tag == "m":
        return {unflatten(key, tensors): unflatten(item, tensors) for key, item in value}
    if tag == "l":
        return [unflatten(item, tensors) for item in value]
    if tag == "u":
        return tuple(unflatten(item, tensors) for item in value)
    raise ValueError(f"unknown tag {tag!r}")


def layout_of(tensors: list[torch.Tensor]) -> list[list[Any]]:
    """[dtype, local shape] of each tensor: what this rank holds of it."""
    from trainer.checkpoint.torch_compat import local_shard  # DCP's import: not for the agent, which names folders

    return _layout([local_shard(t) for t in tensors])


def _layout(local_tensors: list[torch.Tensor]) -> list[list[Any]]:
    """``layout_of`` for tensors that are this rank's shards already."""
    return [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in local_tensors]


# ---- one rank's two slots ----------------------------------------------------------------------------
@dataclass
class Manifest:
    """What a complete slot holds; written last, by rename, once its bytes are in."""

    format: int
    run_id: str
    config_digest: str
    step: int
    world_size: int
    rank: int
    layout: list[list[Any]]  # [dtype, shape] per tensor, in order
    offsets: list[int]
    state: Any  # the flattened state (see ``flatten``)
    created: float

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest at ``path``, or None when it is missing or malformed (never trusted further)."""
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (OSError, ValueError, TypeError):
            return None
        if manifest.format != FORMAT or not _valid_layout(manifest.layout, manifest.offsets):
            return None
        return manifest


class SnapshotSlots:
    """One rank's snapshots: ``slot-K.bin`` (the bytes, mapped) and ``slot-K.json`` (the manifest)."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder = folder / f"rank-{rank}"
        self.rank = rank
        self._maps: dict[int, torch.Tensor] = {}  # slot -> its mapped bytes
        self._newest: int | None = None  # the slot this process last completed: no need to read the manifests

    def manifest_path(self, slot: int) -> Path:
        return self.folder / f"slot-{slot}.json"

    def data_path(self, slot: int) -> Path:
        return self.folder / f"slot-{slot}.bin"

    def complete(self) -> dict[int, Manifest]:
        """{slot: manifest} of the complete slots whose bytes file is as large as the manifest says."""
        found = {}
        for slot in range(SLOTS):
            manifest = Manifest.read(self.manifest_path(slot))
            if manifest is None:
                continue
            try:
                size = self.data_path(slot).stat().st_size
            except OSError:
                continue
            if size >= _size_of(manifest.layout, manifest.offsets):
                found[slot] = manifest
        return found

    def take(self, state: Any, *, step: int, world_size: int, run_id: str, config_digest: str) -> int:
        """Copy ``state`` into the slot that does not hold the newest complete snapshot; returns the
        bytes copied. The slot is marked incomplete first and complete last."""
        from trainer.checkpoint.torch_compat import copy_all, local_shard

        encoded, tensors = flatten(state)
        tensors = [local_shard(tensor) for tensor in tensors]
        layout = _layout(tensors)
        offsets = _offsets(layout)
        newest = self._newest
        if newest is None:  # the first snapshot of this process: what an earlier one left decides
            complete = self.complete()
            newest = max(complete, key=lambda slot: complete[slot].step, default=None)
        slot = 0 if newest is None else (newest + 1) % SLOTS
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.manifest_path(slot).unlink(missing_ok=True)  # from here on this slot is not complete
        buffer = self._map(slot, _size_of(layout, offsets))
        with torch.no_grad():
            copy_all([_view(buffer, offset, t.dtype, t.shape) for offset, t in zip(offsets, tensors)],
                     [t.detach() for t in tensors])
        manifest = Manifest(FORMAT, run_id, config_digest, step, world_size, self.rank, layout, offsets, encoded,
                            time.time())
        fields = {field.name: getattr(manifest, field.name) for field in dataclass_fields(manifest)}  # no deep copy
        _write_private(self.manifest_path(slot), json.dumps(fields, separators=(",", ":")))
        self._newest = slot
        return sum(t.numel() * t.element_size() for t in tensors)

    def restore(self, slot: int, manifest: Manifest, live: Any) -> Any:
        """Copy the slot's bytes into ``live``'s tensors (they must have the snapshot's layout), and
        return ``live``'s structure with the snapshot's values: what ``load_state_dict`` takes."""
        from trainer.checkpoint.torch_compat import copy_all, local_shard

        _, originals = flatten(live)
        targets = [local_shard(tensor) for tensor in originals]
        if _layout(targets) != manifest.layout:
            raise ValueError("the live state's layout differs from the snapshot's")
        buffer = self._map(slot, _size_of(manifest.layout, manifest.offsets))
        with torch.no_grad():
            copy_all(targets, [_view(buffer, offset, t.dtype, t.shape) for offset, t in zip(manifest.offsets,
                                                                                           targets)])
        return unflatten(manifest.state, originals)

    def drop(self) -> None:
        """Forget every snapshot of this rank (one that failed to restore must not be offered again)."""
        self._maps.clear()
        self._newest = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _map(self, slot: int, size: int) -> torch.Tensor:
        """The slot's bytes file, ``size`` bytes at least, mapped shared (created 0600)."""
        mapped = self._maps.get(slot)
        if mapped is not None and mapped.numel() >= size:
            return mapped
        path = self.data_path(slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        mapped = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        self._maps[slot] = mapped
        return mapped


def _valid_layout(layout: Any, offsets: Any) -> bool:
    """Known dtypes, whole non-negative sizes, and the offsets this module would have chosen."""
    try:
        known = all(dtype in DTYPES and all(type(size) is int and size >= 0 for size in shape)
                    for dtype, shape in layout)
        return known and offsets == _offsets(layout)
    except (TypeError, ValueError):
        return False


def _offsets(layout: list[list[Any]]) -> list[int]:
    offsets, position = [], 0
    for dtype, shape in layout:
        offsets.append(position)
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        position += -(-nbytes // ALIGN) * ALIGN
    return offsets


def _size_of(layout: list[list[Any]], offsets: list[int]) -> int:
    if not layout:
        return ALIGN
    dtype, shape = layout[-1]
    return max(ALIGN, offsets[-1] + math.prod(shape) * DTYPES[dtype].itemsize)


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size | list[int]) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[offset:offset + nbytes].view(dtype).view(tuple(shape))


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new 0600 file beside ``path`` and rename it there: all or nothing."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
