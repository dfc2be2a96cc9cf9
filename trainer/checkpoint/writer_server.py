"""The writer server: the main of the writer process, which runs each async save's ``dcp.save``
outside the trainer process. The trainer's side is ``writer_client``; the messages, ``wire``.

A writer thread shares the trainer's GIL, and a save's pickling holds it for milliseconds at
a time while training waits to launch its next op. In a process of its own the same work
only competes for a core. One writer process per rank lives as long as the trainer; the
writers form their own gloo group (on the job's store, under a fresh prefix) and map the
trainer's staging memory, so a save request carries only the small non-tensor values.

It dies with its trainer (``PR_SET_PDEATHSIG``) so a killed rank never leaves a writer that
could still commit, and it ignores SIGINT/SIGTERM: stopping is the trainer's decision.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DeviceMesh

from trainer.checkpoint import wire
from trainer.checkpoint.failures import root_cause
from trainer.checkpoint.marker import CommitMarker
from trainer.checkpoint.planner import new_save_planner
from trainer.checkpoint.records import ItemRecords
from trainer.checkpoint.save_thread import BACKGROUND_NICE
from trainer.checkpoint.shared_arena import ShardingRef, SharedArena, TensorRef, fill_slots, materialize
from trainer.checkpoint.storage import new_storage_writer
from trainer.checkpoint.wire import Failed, Hello, Map, Ready, Save, Saved

_PR_SET_PDEATHSIG = 1

def _die_with(parent_pid: int) -> None:
    """Be killed when the trainer dies, however it dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed socket still ends the loop
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


class WriterState:
    """What the writer server keeps across saves: the mapped staging memory, its tensors, the plan
    and record caches."""

    def __init__(self) -> None:
        self._arena: SharedArena | None = None
        self.tensors: list[torch.Tensor] = []  # the mapped staging buffers, in the trainer's ref order
        self._unmapped = "no staging memory was mapped before the first save"  # why saves cannot run
        self._meshes: dict[tuple, DeviceMesh] = {}
        self._planner = new_save_planner()
        self._records = ItemRecords()

    def map(self, fd: int, nbytes: int, refs: list[TensorRef]) -> None:
        """Map the trainer's staging memory and build its tensors now, between saves, not in the first one.

        Building the first DTensor imports ``torch._dynamo``, most of a CPU-second; the trainer
        does not wait for a map, so that cost lands while it trains its first steps. A failure
        is answered at the next save, as a failed save.
        """
        if self._arena is not None:
            self._arena.close()
        self._arena, self.tensors = SharedArena(nbytes, fd=fd), []
        try:
            with torch.no_grad():  # the same objects every save: the planner and records caches hold
                self.tensors = [materialize(self._arena, ref, self._mesh(ref.sharding)) for ref in refs]
        except Exception as exc:  # noqa: BLE001 - reported to the trainer by the next save
            self._arena.close()
            self._arena, self._unmapped = None, f"could not map the staging memory: {root_cause(exc)}"

    def _mesh(self, sharding: ShardingRef | None) -> DeviceMesh | None:
        if sharding is None:
            return None
        key = (str(sharding.mesh_ranks), sharding.mesh_dim_names)
        if key not in self._meshes:
            self._meshes[key] = DeviceMesh("cpu", torch.tensor(sharding.mesh_ranks),
                                           mesh_dim_names=sharding.mesh_dim_names)
        return self._meshes[key]

    def save(self, slotted: Any, path: str, draft: CommitMarker) -> CommitMarker | None:
        """Write one checkpoint; the commit marker on the coordinator, None elsewhere."""
        if self._arena is None:
            raise RuntimeError(self._unmapped)
        committed: list[CommitMarker] = []
        writer = new_storage_writer(Path(path), draft, on_commit=committed.append, records=self._records)
        dcp.save(fill_slots(slotted, self.tensors), storage_writer=writer, planner=self._planner)
        return committed[0] if committed else None


def _join_group(hello: Hello) -> None:
    store = dist.TCPStore(hello.store_host, hello.store_port, is_master=False,
                          timeout=timedelta(seconds=hello.timeout_s))
    dist.init_process_group("gloo", store=dist.PrefixStore(hello.store_prefix, store), rank=hello.rank,
                            world_size=hello.world_size, timeout=timedelta(seconds=hello.timeout_s))


def serve(sock: socket.socket) -> None:
    """Join the writers' group, then answer save requests until the trainer closes the socket."""
    hello, _ = wire.receive(sock)
    try:
        _join_group(hello)
    except Exception as exc:  # noqa: BLE001 - reported to the trainer, which falls back to a thread
        wire.send(sock, Failed(f"could not join the writers' group: {root_cause(exc)}"))
        return
    wire.send(sock, Ready())
    state = WriterState()
    while True:
        try:
            message, fds = wire.receive(sock)
        except EOFError:
            break
        if isinstance(message, Map):
            state.map(fds[0], message.nbytes, message.refs)
            continue
        assert isinstance(message, Save), message
        try:
            wire.send(sock, Saved(state.save(message.slotted, message.path, message.draft)))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - the trainer decides what a failure means
            wire.send(sock, Failed(root_cause(exc)))
    dist.destroy_process_group()


def main() -> None:
    run(int(sys.argv[1]), int(sys.argv[2]))


def run(socket_fd: int, parent_pid: int) -> None:
    """Serve the trainer ``parent_pid`` on ``socket_fd`` until it closes: in a process of its own
    (``main``), or forked from a warm worker before it started anything (``launcher.worker``)."""
    _die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)  # threads started later (gloo's) inherit it
    except OSError:
        pass
    torch.set_num_threads(1)
    with socket.socket(fileno=socket_fd) as sock:
        serve(sock)


if __name__ == "__main__":
    main()
