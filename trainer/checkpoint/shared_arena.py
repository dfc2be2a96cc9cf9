"""Host memory that the trainer and its writer process both see, and how tensors in it are named.

The staging buffers live in one block of memory. On Linux it is a ``memfd``: the trainer
copies the state into it, and the writer process maps the same pages and writes them out,
so no byte crosses a pipe. A ``memfd`` is not ``/dev/shm``, which containers cap at 64 MB
by default. Elsewhere the block is ordinary process memory and only a writer thread can use it.

A tensor in the block travels to the other process as a ``TensorRef`` (where it is and what it
is); in a staged state dict each tensor is replaced by a ``TensorSlot`` (which ref).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DeviceMesh, DTensor

from trainer.checkpoint.torch_compat import local_shard

ALIGNMENT = 64  # bytes: every tensor starts on a cache line, which suits every dtype's view


@dataclass(frozen=True)
class ShardingRef:
    """A DTensor's sharding, in terms the writer process can rebuild it from."""

    mesh_ranks: list
    mesh_dim_names: tuple[str, ...] | None
    placements: tuple
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class TensorRef:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    sharding: ShardingRef | None  # None: a plain tensor


@dataclass(frozen=True)
class TensorSlot:
    """Stands for ``refs[index]`` in a state dict sent to the writer process."""

    index: int


def shared_memory_supported() -> bool:
    return hasattr(os, "memfd_create")


class SharedArena:
    """One block of host memory, shareable with a child process by file descriptor where the OS allows."""

    def __init__(self, nbytes: int, fd: int | None = None) -> None:
        self.nbytes = max(nbytes, 1)
        self.fd = fd
        self._map: mmap.mmap | None = None
        if fd is None and shared_memory_supported():
            self.fd = os.memfd_create("fsdp-train-staging", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.nbytes)
        self._pinned = False
        if self.fd is not None:
            self._map = mmap.mmap(self.fd, self.nbytes)
            self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        else:
            self.bytes = torch.empty(self.nbytes, dtype=torch.uint8)

    def pin(self) -> None:
        """Page-lock the block for fast GPU-to-host copies (what DCP's own staging does for shared memory)."""
        if torch.cuda.is_available() and not self._pinned:
            self._pinned = int(torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), self.nbytes, 0)) == 0

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape) * dtype.itemsize
        return self.bytes[offset:offset + count].view(dtype).view(shape)

    def close(self) -> None:
        """Release the block; a view still in use keeps its pages until it is gone."""
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
            self._pinned = False
        self.bytes = torch.empty(0, dtype=torch.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views it: the mapping goes with that tensor
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with its dicts, lists and tuples rebuilt and every other value replaced by ``leaf(value)``."""
    if isinstance(value, dict):
        return {key: map_leaves(item, leaf) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(map_leaves(item, leaf) for item in value)
    return leaf(value)


def place(tensors: list[torch.Tensor]) -> tuple[SharedArena, list[TensorRef]]:
    """An arena with room for a contiguous copy of each tensor (a DTensor: its local shard), and their refs."""
    refs: list[TensorRef] = []
    offset = 0
    for tensor in tensors:
        local = local_shard(tensor)
        sharding = None
        if isinstance(tensor, DTensor):
            mesh = tensor.device_mesh
            sharding = ShardingRef(mesh.mesh.tolist(), mesh.mesh_dim_names, tuple(tensor.placements),
                                   tuple(tensor.shape), tuple(tensor.stride()))
        refs.append(TensorRef(offset, local.dtype, tuple(local.shape), sharding))
        offset += -(-local.numel() * local.element_size() // ALIGNMENT) * ALIGNMENT
    return SharedArena(offset), refs


def materialize(arena: SharedArena, ref: TensorRef, mesh: DeviceMesh | None) -> torch.Tensor:
    """The tensor ``ref`` names in ``arena``: a view of its bytes, wrapped as a DTensor on ``mesh`` if sharded."""
    local = arena.view(ref.offset, ref.dtype, ref.shape)
    if ref.sharding is None:
        return local
    return DTensor.from_local(local, mesh, ref.sharding.placements, run_check=False,
                              shape=torch.Size(ref.sharding.shape), stride=ref.sharding.stride)


def fill_slots(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with every ``TensorSlot`` replaced by the tensor it stands for."""
    return map_leaves(value, lambda leaf: tensors[leaf.index] if isinstance(leaf, TensorSlot) else leaf)
