"""The learning-rate schedule, and what a resume with other settings does to it.

A checkpoint stores the scheduler's state, including the peak lr it started with; on resume the
schedule is re-based on this run's settings, so a changed ``--lr``, warm-up or horizon takes
effect from the resumed step on (when nothing changed, the values are bit-identical). Each change
that moves the trajectory is reported with its effect at the resumed step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data.dataset import same_data


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over the decay horizon."""
    horizon = max(horizon_of(cfg), 1)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def horizon_of(cfg: TrainConfig) -> int:
    return cfg.decay_steps or cfg.max_steps


def new_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(cfg, step))


def rebase(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig) -> None:
    """After a resume: this run's peak lr and schedule, from the resumed step on."""
    step = scheduler.last_epoch
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_multiplier(cfg, step)  # the same expression LambdaLR evaluates
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def _recorded(cfg: TrainConfig, recorded: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(cfg, **{k: v for k, v in recorded.items() if k in names})


def setting_changes(recorded: dict[str, Any], cfg: TrainConfig, step: int, recorded_data: dict | None,
                    data: dict | None) -> list[str]:
    """One line per setting that shapes the trajectory and differs from the checkpoint's run."""
    old = _recorded(cfg, recorded)
    before, after = old.lr * lr_multiplier(old, step), cfg.lr * lr_multiplier(cfg, step)
    effect = f": lr at step {step} goes {before:.2e} -> {after:.2e}"
    changes = []
    if horizon_of(old) != horizon_of(cfg):
        why = " (--max-steps with --decay-steps 0)" if not cfg.decay_steps and not old.decay_steps else ""
        changes.append(f"lr schedule horizon {horizon_of(old)} -> {horizon_of(cfg)}{why}{effect}")
    for name in ("lr", "warmup_steps", "min_lr_ratio"):
        if getattr(old, name) != getattr(cfg, name):
            changes.append(f"{name} {getattr(old, name)} -> {getattr(cfg, name)}{effect}")
    if old.global_batch_size != cfg.global_batch_size:
        changes.append(f"global_batch_size {old.global_batch_size} -> {cfg.global_batch_size}: each step now "
                       f"takes {cfg.global_batch_size} samples")
    if not same_data(recorded_data, data):
        changes.append(f"dataset changed (--allow-data-change): {'synthetic' if not recorded_data else 'one'} -> "
                       f"{'synthetic' if not data else cfg.data}, continuing at the same sample index")
    return changes
