"""Messages between the trainer and its writer process: pickles over a Unix socket pair.

Both ends are the same job's own processes, so pickle is safe here. A message may carry
file descriptors (the staging memory); they travel with its first bytes (``SCM_RIGHTS``).
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

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
