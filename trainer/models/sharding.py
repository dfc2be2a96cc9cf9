"""Where FSDP2 shards a model, and activation checkpointing that keeps its module names."""

from __future__ import annotations

import fnmatch

import torch.utils.checkpoint
from torch import nn

from trainer.errors import UserError


def shard_units(model: nn.Module, pattern: str | None, spec: str) -> list[nn.Module]:
    """What FSDP2 shards below the root, innermost first: ``model.shard_units()`` when it exists,
    else the modules whose FQNs match ``pattern``, else the blocks a ``transformers`` model names in
    ``_no_split_modules`` (its decoder layers), else the entries of its ``ModuleList`` children."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    if pattern:
        named = [(name, module) for name, module in model.named_modules() if name]
        units = [module for name, module in reversed(named) if fnmatch.fnmatchcase(name, pattern)]
        if not units:
            names = ", ".join(name for name, _ in named[:6])
            raise UserError(f"--shard-modules {pattern}: matches no module of --model {spec} (its modules "
                            f"start {names}); pass a glob over those names")
        return units
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if blocks:
        return [module for module in reversed(list(model.modules())) if type(module).__name__ in blocks]
    return [entry for child in model.children() if isinstance(child, nn.ModuleList) for entry in child]


def recompute_activations(unit: nn.Module) -> None:
    """Activation checkpointing that keeps the module's FQNs (so checkpoints load with it on or off):
    its forward runs under ``torch.utils.checkpoint`` and is run again in the backward pass."""
    forward = unit.forward

    def recomputed(*args: object, **kwargs: object) -> object:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = recomputed  # type: ignore[method-assign]
