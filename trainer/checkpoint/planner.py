"""DCP's default save planner, minus rebuilding an unchanged local plan on every save.

With plan caching on, DCP already skips sending an unchanged plan to the coordinator, but it
still builds the local plan each save to find out that nothing changed: every DTensor's
shard offsets are recomputed, on a CPU that training needs. A local plan depends only on the
state dict's *layout* (keys, shapes, dtypes, sharding), which is fixed between saves, so this
planner compares the layout, a fraction of the cost, and rebuilds the plan only when the
layout changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.tensor import DTensor

from trainer.checkpoint import torch_compat
from trainer.checkpoint.torch_compat import local_shard


def _leaf_layout(value: Any) -> tuple | None:
    """What a value's write items depend on; None for values this planner does not cache."""
    if isinstance(value, DTensor):
        local = local_shard(value)
        return ("dtensor", value.shape, value.dtype, value.requires_grad, local.shape, local.is_pinned(),
                value.placements, id(value.device_mesh))
    if type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
        return "tensor", value.shape, value.dtype, value.requires_grad, value.is_pinned()
    if isinstance(value, torch.Tensor):  # sharded or other tensor subclasses: always planned afresh
        return None
    return ("bytes",)


def state_dict_layout(state_dict: dict[str, Any], is_coordinator: bool) -> tuple | None:
    """The layout of a flattened state dict, or None when some value's plan is never reused."""
    leaves = []
    for key, value in state_dict.items():
        layout = _leaf_layout(value)
        if layout is None:
            return None
        leaves.append((key, layout))
    return is_coordinator, tuple(leaves)


class LayoutCachingSavePlanner(DefaultSavePlanner):
    """``DefaultSavePlanner(enable_plan_caching=True)`` that reuses its local plan for an unchanged layout."""

    def __init__(self) -> None:
        super().__init__(enable_plan_caching=True)
        self._layout: tuple | None = None
        self._layout_plan: SavePlan | None = None

    def create_local_plan(self) -> SavePlan:
        layout = state_dict_layout(self.state_dict, self.is_coordinator)
        accepted = torch_compat.accepted_local_plan(self)
        if layout is not None and layout == self._layout and accepted is self._layout_plan is not None:
            self.plan = accepted  # what DCP's own unchanged-plan branch leaves here
            return SavePlan([], usable=False)
        plan = super().create_local_plan()
        # The plan DCP promotes to its cache once this save's global plan succeeds: ours when it
        # changed, the already cached one when it did not.
        self._layout = layout
        self._layout_plan = self.plan if plan.usable else accepted
        return plan


def new_save_planner() -> DefaultSavePlanner:
    """The planner saves use: this one, or DCP's own where torch is outside the tested range."""
    return LayoutCachingSavePlanner() if torch_compat.fast_paths() else DefaultSavePlanner(enable_plan_caching=True)
