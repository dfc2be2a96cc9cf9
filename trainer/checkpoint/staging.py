"""Stage a state dict into host buffers that are allocated once and reused.

The training step is blocked only while tensors are copied into these buffers;
the background writer then reads the copies while training mutates the
originals. Buffers are sized up front (``prepare``) so the first save is as
cheap as every later one. Pinned memory is used only where CUDA exists.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict


class ReusableHostStager:
    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def prepare(self, state_dict: dict[str, Any]) -> None:
        self._buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        _copy_state_dict(state_dict, self._buffers)  # fault every page in now, not during the first save

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._buffers is None:
            self.prepare(state_dict)
        return _copy_state_dict(state_dict, self._buffers)

    def close(self) -> None:
        self._buffers = None
