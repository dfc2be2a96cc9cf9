"""Stage a state dict into host buffers that are allocated once and reused.

The training step is blocked only while tensors are copied into these buffers;
the background writer then reads the copies while training mutates the
originals. Buffers are sized up front (``prepare``) so the first save is as
cheap as every later one. Pinned memory is used only where CUDA exists.
All tensors are copied by one ``_foreach_copy_`` call, not one call each.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed._state_dict_utils import _create_cpu_state_dict
from torch.distributed.tensor import DTensor

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


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(item) for item in value.values())
    return type(value) in (list, tuple) and any(_holds_tensor(item) for item in value)


class ReusableHostStager:
    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

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
            self._buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
            sources.clear()
            targets.clear()
            staged = _mirror(state_dict, self._buffers, sources, targets)
        with torch.no_grad():  # a snapshot, not part of any graph
            torch._foreach_copy_(targets, sources)
        return staged

    def close(self) -> None:
        self._buffers = None
