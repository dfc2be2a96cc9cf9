"""Everything a resume needs, as one DCP ``Stateful``.

``get_state_dict``/``set_state_dict`` give FQN-keyed, sharded (DTensor) model and
optimizer state; DCP loads into those pre-allocated shards in place, whatever
world size wrote them, which is what makes every resume a resharding resume.
Checkpoint keys: ``app.model.<fqn>``, ``app.optim.state.<fqn>.<exp_avg|exp_avg_sq|step>``,
``app.optim.param_groups.*``, ``app.trainer.{step,samples_seen,seed,scheduler}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint.torch_compat import local_shard

STATE_KEY = "app"


@dataclass
class Progress:
    step: int = 0
    samples_seen: int = 0


def _address(value: Any) -> int:
    """Data address of a tensor (a DTensor's local shard), or the identity of any other value."""
    if isinstance(value, torch.Tensor):
        return local_shard(value).data_ptr()
    return id(value)


class AppState(Stateful):
    """Model, optimizer, scheduler and progress of one trainer as one DCP ``Stateful``.

    ``get_state_dict`` walks every parameter to build FQN maps, which would be most of an
    async save's stall. The tensors it
    returns are the live ones (FSDP2 keeps sharded storage in place; the optimizer
    updates its state in place), so the result is reused while every live tensor is
    the one it was built from; only the optimizer's hyperparameters are refreshed.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, seed: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.progress = progress
        self.seed = seed
        self._cached: tuple[list[int], dict[str, Any], dict[str, Any]] | None = None

    def _live_tensor_addresses(self) -> list[int]:
        """Where every model and optimizer tensor lives now; differs once any of them is replaced."""
        addresses = [_address(t) for t in (*self.model.parameters(), *self.model.buffers())]
        for state in self.optimizer.state.values():
            addresses += [_address(value) for value in state.values()]
        return addresses

    def _model_and_optim_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        addresses = self._live_tensor_addresses()
        if self._cached is None or self._cached[0] != addresses:
            self._cached = (addresses, *get_state_dict(self.model, self.optimizer))
        _, model_state, optim_state = self._cached
        for saved, live in zip(optim_state["param_groups"], self.optimizer.param_groups):
            saved.update((key, value) for key, value in live.items() if key != "params")
        return model_state, optim_state

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = self._model_and_optim_state()
        return {
            "model": model_state,
            "optim": optim_state,
            "trainer": {
                "step": self.progress.step,
                "samples_seen": self.progress.samples_seen,
                "seed": self.seed,
                "scheduler": self.scheduler.state_dict(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cached = None  # loading may replace optimizer state tensors
        set_state_dict(self.model, self.optimizer,
                       model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
        trainer = state_dict["trainer"]
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.progress.step = int(trainer["step"])
        self.progress.samples_seen = int(trainer["samples_seen"])


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Materialise optimizer state exactly as a first real step would find it.

    DCP needs the state allocated to load into (and staging needs it to size
    buffers). A zero-LR step on zero grads allocates it; resetting ``step`` to 0
    keeps Adam's bias correction identical to a lazily initialised optimizer.
    """
    if optimizer.state:
        return
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, saved_lrs):
        group["lr"] = lr
    for state in optimizer.state.values():
        if "step" in state:
            state["step"].zero_()
