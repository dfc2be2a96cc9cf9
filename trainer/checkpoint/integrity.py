"""Sizes and checksums of checkpoint files, recorded at commit and checked at load.

Checksums are XXH3-64 (xxhash), several times faster than zlib's CRC32, so computing
one while writing and verifying one while loading stays far below disk time. Each file
gets one checksum per 64 MiB block, not one for the whole file: a whole-file checksum
must be computed by one process reading the whole file, so a job resumed on more ranks
than wrote the checkpoint would leave the extra ranks idle while a few read everything.
Blocks are shared out evenly by bytes instead. Markers written before blocks carry one
``xxh3_64`` per file and still verify, as one span per file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

CHUNK = 1024 * 1024  # read into one reused buffer that stays in cache while it is hashed
BLOCK_BYTES = 64 * 1024 * 1024
ALGORITHM = "xxh3_64"
BLOCKS = f"{ALGORITHM}_blocks"  # marker key: one digest per BLOCK_BYTES of the file, in order


def new_hasher() -> xxhash.xxh3_64:
    return xxhash.xxh3_64()


class BlockDigests:
    """Checksums of consecutive ``block_bytes`` blocks of a byte stream, fed in order as it is written."""

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self.size = 0
        self._done: list[str] = []
        self._current = new_hasher()

    def update(self, data: memoryview) -> None:
        """Add ``data`` (a byte view, format ``B``)."""
        while len(data):
            room = self.block_bytes - self.size % self.block_bytes
            self._current.update(data[:room])
            self.size += min(room, len(data))
            data = data[room:]
            if self.size % self.block_bytes == 0:
                self._done.append(self._current.hexdigest())
                self._current = new_hasher()

    def entry(self) -> dict[str, Any]:
        """The file's marker entry: its size and its blocks' checksums (an empty file has one, of nothing)."""
        partial = [self._current.hexdigest()] if self.size % self.block_bytes or not self._done else []
        return {"bytes": self.size, "block_bytes": self.block_bytes, BLOCKS: self._done + partial}


@dataclass(frozen=True)
class Span:
    """A byte range of one file and the checksum recorded for it."""

    name: str
    start: int
    length: int
    digest: str
    whole_file: bool


def describe(entry: dict[str, Any]) -> str:
    """How a file's checksums were recorded, for listings."""
    if BLOCKS in entry:
        return f"{ALGORITHM}, {len(entry[BLOCKS])} block(s) of {entry['block_bytes'] >> 20} MiB"
    return f"{ALGORITHM} {entry[ALGORITHM]}"


def spans(recorded: dict[str, dict[str, Any]]) -> list[Span]:
    """Every checksummed range of every recorded file, in file then byte order."""
    found = []
    for name in sorted(recorded):
        entry = recorded[name]
        if BLOCKS not in entry:
            found.append(Span(name, 0, entry["bytes"], entry[ALGORITHM], whole_file=True))
            continue
        step = entry["block_bytes"]
        for index, digest in enumerate(entry[BLOCKS]):
            start = index * step
            found.append(Span(name, start, max(0, min(step, entry["bytes"] - start)), digest,
                              whole_file=len(entry[BLOCKS]) == 1))
    return found


def share(all_spans: list[Span], rank: int, world_size: int) -> list[Span]:
    """This rank's part of ``all_spans``: consecutive spans, about ``1/world_size`` of the bytes each."""
    total = sum(span.length for span in all_spans) or 1
    mine, before = [], 0
    for span in all_spans:
        if min(world_size - 1, (before + span.length // 2) * world_size // total) == rank:
            mine.append(span)
        before += span.length
    return mine


def file_digest(path: Path) -> dict[str, Any]:
    """A file's marker entry, computed by reading it."""
    digests, buffer = BlockDigests(), memoryview(bytearray(CHUNK))
    with path.open("rb", buffering=0) as src:
        while count := src.readinto(buffer):
            digests.update(buffer[:count])
    return digests.entry()


def _resized(path: Path, size: int, expected: int) -> str:
    return f"{path}: {size} bytes, {expected} recorded at commit (truncated or rewritten)"


def _altered(path: Path, span: Span) -> str:
    where = "" if span.whole_file else f" of bytes {span.start}-{span.start + span.length}"
    return f"{path}: checksum{where} differs from the one recorded at commit (altered)"


def bytes_problem(path: Path, data: bytes, recorded: dict[str, Any]) -> str | None:
    """What is wrong with a file's bytes, already read, against its marker entry; None if intact."""
    if len(data) != recorded["bytes"]:
        return _resized(path, len(data), recorded["bytes"])
    view = memoryview(data)
    return next((_altered(path, span) for span in spans({path.name: recorded})
                 if _digest(view[span.start:span.start + span.length]) != span.digest), None)


def _digest(data: memoryview) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


def _span_digest(path: Path, span: Span, buffer: memoryview) -> str:
    hasher, left = new_hasher(), span.length
    with path.open("rb", buffering=0) as src:
        src.seek(span.start)
        while left and (count := src.readinto(buffer[:min(left, len(buffer))])):
            hasher.update(buffer[:count])
            left -= count
    return hasher.hexdigest()


def problems(checkpoint: Path, recorded: dict[str, dict[str, Any]], rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with a checkpoint's files, one message each: every file's size, and the
    checksums of this rank's share of the spans (all of them in one process)."""
    found, reported = [], set()
    for name in sorted(recorded):
        path, expected = checkpoint / name, recorded[name]["bytes"]
        if not path.is_file():
            found.append(f"{path}: missing")
        elif (size := path.stat().st_size) != expected:
            found.append(_resized(path, size, expected))
        else:
            continue
        reported.add(name)
    buffer = memoryview(bytearray(CHUNK))
    for span in share(spans(recorded), rank, world_size):
        if span.name in reported or _span_digest(checkpoint / span.name, span, buffer) == span.digest:
            continue
        found.append(_altered(checkpoint / span.name, span))
        reported.add(span.name)  # one message per file is enough
    return found
