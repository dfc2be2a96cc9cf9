"""The messages between a trainer (the writer client) and its writer process (the writer server).

They travel as pickles over a Unix socket pair. Both ends are the same job's own processes,
so pickle is safe here; nothing from a checkpoint ever crosses this socket. A message may
carry file descriptors (the staging memory); they travel with its first bytes (``SCM_RIGHTS``).

    client                         server
    Hello          ------------>   joins the writers' gloo group
                   <------------   Ready | Failed
    Map + memfd    ------------>   maps the staging memory (no answer)
    Save           ------------>   dcp.save of the staged state
                   <------------   Saved | Failed
    (closes the socket)            leaves its group and exits
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

from trainer.checkpoint.marker import CommitMarker
from trainer.checkpoint.shared_arena import TensorRef


@dataclass(frozen=True)
class Hello:
    """The first message: who this writer is and where its group meets."""

    rank: int
    world_size: int
    store_host: str
    store_port: int
    store_prefix: str
    timeout_s: float


@dataclass(frozen=True)
class Ready:
    """The writer joined its group and takes saves."""


@dataclass(frozen=True)
class Failed:
    """Joining, or a save, failed; ``reason`` is one short phrase."""

    reason: str


@dataclass(frozen=True)
class Map:
    """Map the staging memory sent with this message: ``nbytes`` long, tensors at ``refs``."""

    nbytes: int
    refs: list[TensorRef]


@dataclass(frozen=True)
class Save:
    """Write ``slotted`` (a staged state dict with ``TensorSlot``s for its tensors) to ``path``."""

    slotted: Any
    path: str
    draft: CommitMarker


@dataclass(frozen=True)
class Saved:
    """The save is durable; the commit marker on the coordinator, None on other ranks."""

    marker: CommitMarker | None

_LENGTH = struct.Struct("!Q")
MAX_FDS = 4


def send(sock: socket.socket, message: Any, fds: tuple[int, ...] = ()) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = _LENGTH.pack(len(payload))
    if fds:
        sent = socket.send_fds(sock, [header], list(fds))
        sock.sendall(header[sent:])
    else:
        sock.sendall(header)
    sock.sendall(payload)


def receive(sock: socket.socket) -> tuple[Any, list[int]]:
    """The next message and any descriptors sent with it; ``EOFError`` once the other end is gone."""
    header, fds, _flags, _address = socket.recv_fds(sock, _LENGTH.size, MAX_FDS)
    if not header:
        raise EOFError("the other end closed the connection")
    header += _exactly(sock, _LENGTH.size - len(header))
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(_exactly(sock, length)), fds


def _exactly(sock: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    view = memoryview(buffer)
    received = 0
    while received < count:
        got = sock.recv_into(view[received:])
        if not got:
            raise EOFError("the other end closed the connection mid-message")
        received += got
    return bytes(buffer)
