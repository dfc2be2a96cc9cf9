"""Stage a state dict into host buffers that are allocated once and reused.

The training step is blocked only while tensors are copied into these buffers;
the background writer then reads the copies while training mutates the
originals. Buffers are sized up front (``prepare``) so the first save is as
cheap as every later one. They are views into one ``SharedArena``, so a writer
process can map them too; pinned only where CUDA exists. All tensors are
copied by one ``_foreach_copy_`` call, not one call each.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from trainer.checkpoint.shared_arena import SharedArena, TensorRef, TensorSlot, materialize, place

SCALAR_TYPES = (int, float, bool, str, bytes, type(None))  # immutable: staged as they are


class _LayoutChanged(Exception):
    """The state dict no longer has the structure or tensor shapes the buffers were made for."""


def _local(value: torch.Tensor) -> torch.Tensor:
    return value._local_tensor if isinstance(value, DTensor) else value


def _mirror(value: Any, buffer: Any, sources: list[torch.Tensor], targets: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by its buffer; the copies to make go into ``sources``/``targets``.

    Containers are rebuilt and other values copied, so training may change the originals
    while the staged dict is being written.
    """
    if isinstance(value, torch.Tensor):
        if not isinstance(buffer, torch.Tensor):
            raise _LayoutChanged
        source, target = _local(value), _local(buffer)
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
    if _holds_tensor(value):  # a container whose tensors have no buffers yet
        raise _LayoutChanged
    return copy.deepcopy(value)


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in the order ``_mirror`` visits them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    if type(value) in (list, tuple):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _replace_tensors(value: Any, replacements: dict[int, Any]) -> Any:
    """``value`` with containers rebuilt and each tensor swapped for ``replacements[id(tensor)]``.

    Other leaves are dropped (None): ``_mirror`` takes them from the state dict at each stage.
    """
    if isinstance(value, torch.Tensor):
        return replacements[id(value)]
    if isinstance(value, dict):
        return {key: _replace_tensors(item, replacements) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_replace_tensors(item, replacements) for item in value)
    return value if isinstance(value, SCALAR_TYPES) else None


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(item) for item in value.values())
    return type(value) in (list, tuple) and any(_holds_tensor(item) for item in value)


class ReusableHostStager:
    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None
        self.arena: SharedArena | None = None
        self.refs: list[TensorRef] = []  # where each buffer lives in the arena, in ``_mirror`` order
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
            torch._foreach_copy_(targets, sources)
        return staged

    def _allocate(self, state_dict: dict[str, Any]) -> None:
        """Buffers shaped like ``state_dict``'s tensors (a DTensor: its local shard), in a new arena."""
        tensors = _tensors(state_dict)
        arena, refs = place(tensors)
        arena.pin()
        buffers = [materialize(arena, ref, getattr(tensor, "device_mesh", None)) for tensor, ref in zip(tensors, refs)]
        self.close()
        self.arena, self.refs, self.generation = arena, refs, self.generation + 1
        self._buffers = _replace_tensors(state_dict, {id(t): buffer for t, buffer in zip(tensors, buffers)})
        self._slot_of = {id(buffer): TensorSlot(index) for index, buffer in enumerate(buffers)}

    def slotted(self, staged: Any) -> Any:
        """A staged state dict with each buffer replaced by its ``TensorSlot``: what a writer process is sent."""
        if isinstance(staged, torch.Tensor):
            return self._slot_of[id(staged)]
        if isinstance(staged, dict):
            return {key: self.slotted(item) for key, item in staged.items()}
        if type(staged) in (list, tuple):
            return type(staged)(self.slotted(item) for item in staged)
        return staged

    def close(self) -> None:
        self._buffers = None
        self._slot_of = {}
        if self.arena is not None:
            self.arena.close()
            self.arena = None
