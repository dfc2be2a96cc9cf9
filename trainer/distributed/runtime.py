"""Process-group setup: pick device and backend, and give checkpoints their own group.

Checkpoint collectives run on a separate gloo group so a background save never
interleaves with the training step's collectives on the default group.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.errors import UserError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    checkpoint_group: dist.ProcessGroup
    collective_timeout: float  # seconds any collective waits for a peer

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_runtime(requested_device: str, collective_timeout: float) -> Runtime:
    """Join the job's process group (started by torchrun, or a world of one without it).

    Every collective of both groups gives up after ``collective_timeout`` seconds, so a hung or
    cut-off peer fails the job (and torchrun restarts it) instead of stalling it for torch's
    default 10 or 30 minutes. On GPUs, NCCL's watchdog heartbeat gets the same bound.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    timeout = timedelta(seconds=collective_timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # a timed-out collective ends the process
        os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(int(collective_timeout) + 60))
    else:
        backend = "gloo"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, checkpoint_group, collective_timeout)


RUN_ID_ENV = "FSDP_TRAIN_RUN_ID"  # names the run where it is set (the chart sets it); else torchrun's run id


def run_id(fallback: str | None = None) -> str:
    """This run's name: ``FSDP_TRAIN_RUN_ID``, torchrun's ``TORCHELASTIC_RUN_ID``, ``fallback``, or a new one."""
    return os.environ.get(RUN_ID_ENV) or os.environ.get("TORCHELASTIC_RUN_ID") or fallback or uuid.uuid4().hex


def store_address() -> tuple[str, int]:
    """Where the job's rendezvous store listens (torchrun's, or rank 0's in a world of one)."""
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_primary(runtime: Runtime, action, *args):
    """Run ``action`` on rank 0 only and hand every rank its result, or its ``UserError``."""
    outcome = None
    if runtime.is_primary:
        try:
            outcome = action(*args)
        except UserError as exc:
            outcome = exc
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=runtime.checkpoint_group)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def gather_union(runtime: Runtime, local: list[str]) -> list[str]:
    """Every rank's ``local`` messages, merged, sorted and without repeats, on every rank."""
    gathered: list[list[str]] = [[] for _ in range(runtime.world_size)]
    dist.all_gather_object(gathered, local, group=runtime.checkpoint_group)
    return sorted({message for messages in gathered for message in messages})
