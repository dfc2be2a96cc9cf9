"""Stage a state dict into host buffers that are allocated once and reused.

The training step is blocked only while tensors are copied into these buffers;
the background writer then reads the copies while training mutates the
originals. Buffers are sized up front (``prepare``) so the first save is as
cheap as every later one. They are views into one ``SharedArena``, so a writer
process can map them too; pinned only where CUDA exists. All tensors are
copied by one fused call (``torch_compat.copy_all``), not one call each.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from trainer.checkpoint.shared_arena import (
    SharedArena,
    TensorRef,
    TensorSlot,
    map_leaves,
    materialize,
    place,
)
from trainer.checkpoint.torch_compat import copy_all, local_shard

SCALAR_TYPES = (int, float, bool, str, bytes, type(None))  # immutable: staged as they are


class _LayoutChanged(Exception):
    """The state dict no longer has the structure or tensor shapes the buffers were made for."""


def _mirror(value: Any, buffer: Any, sources: list[torch.Tensor], targets: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by its buffer; the copies to make go into ``sources``/``targets``.

    Containers are rebuilt and other values copied, so training may change the originals
    while the staged dict is being written.
    """
    if isinstance(value, torch.Tensor):
        if not isinstance(buffer, torch.Tensor):
            raise _LayoutChanged
        source, target = local_shard(value), local_shard(buffer)
        if source.shape != target.shape or source.dtype != target.dtype:
            raise _LayoutChanged
        sources.append(source)
        targets.append(target)
        return buffer
    if isinstance(value, dict) and isinstance(buffer, dict) and buffer.keys() == value.keys():
        return {key: _mirror(item, buffer[key], sources, targets) for key, item in value.items()}
    if type(value) in (list, tuple) and isinstance(buffer, (list, tuple)) and len(buffer) == len(value):
        return type(value)(_mirror(item, other, sources, targets) for item, other in zip(value, buffer))
    if isinstance(value, SCALAR_TYPES):
        return value
    if _tensors(value):  # a container whose tensors have no buffers yet
        raise _LayoutChanged
    return copy.deepcopy(value)


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state dict."""
    found: list[torch.Tensor] = []
    map_leaves(value, lambda leaf: found.append(leaf) if isinstance(leaf, torch.Tensor) else None)
    return found


class ReusableHostStager:
    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None
        self.arena: SharedArena | None = None
        self.refs: list[TensorRef] = []  # where each buffer lives in the arena; a TensorSlot indexes this list
        self.generation = 0  # counts allocations: a writer process re-maps when it changes
        self._slot_of: dict[int, TensorSlot] = {}

    def prepare(self, state_dict: dict[str, Any]) -> None:
        """Allocate the buffers and copy once now: every page is faulted in before the first save."""
        self.stage(state_dict)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state_dict`` in the reusable buffers (reallocated only if its layout changed)."""
        sources: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        try:
            staged = _mirror(state_dict, self._buffers, sources, targets)
        except _LayoutChanged:  # also the first time: there are no buffers yet
            self._allocate(state_dict)
            sources.clear()
            targets.clear()
            staged = _mirror(state_dict, self._buffers, sources, targets)
        with torch.no_grad():  # a snapshot, not part of any graph
            copy_all(targets, sources)
        return staged

    def _allocate(self, state_dict: dict[str, Any]) -> None:
        """Buffers shaped like ``state_dict``'s tensors (a DTensor: its local shard), in a new arena."""
        tensors = _tensors(state_dict)
        arena, refs = place(tensors)
        arena.pin()
        buffers = [materialize(arena, ref, getattr(tensor, "device_mesh", None)) for tensor, ref in zip(tensors, refs)]
        self.close()
        self.arena, self.refs, self.generation = arena, refs, self.generation + 1
        buffer_of = {id(tensor): buffer for tensor, buffer in zip(tensors, buffers)}

        def buffer_leaf(leaf: Any) -> Any:  # other values are left out: _mirror copies them at each stage
            if isinstance(leaf, torch.Tensor):
                return buffer_of[id(leaf)]
            return leaf if isinstance(leaf, SCALAR_TYPES) else None

        self._buffers = map_leaves(state_dict, buffer_leaf)
        self._slot_of = {id(buffer): TensorSlot(index) for index, buffer in enumerate(buffers)}

    def slotted(self, staged: Any) -> Any:
        """A staged state dict with each buffer replaced by its ``TensorSlot``: what a writer process is sent."""
        return map_leaves(staged, lambda leaf: self._slot_of[id(leaf)] if isinstance(leaf, torch.Tensor) else leaf)

    def close(self) -> None:
        self._buffers = None
        self._slot_of = {}
        if self.arena is not None:
            self.arena.close()
            self.arena = None
