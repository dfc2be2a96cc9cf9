"""Sizes and CRC32 checksums of checkpoint files, recorded at commit and checked at load."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

CHUNK = 8 * 1024 * 1024


def file_digest(path: Path) -> dict[str, int]:
    crc, size = 0, 0
    with path.open("rb") as src:
        while chunk := src.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def problems(checkpoint: Path, recorded: dict[str, dict[str, Any]], names: list[str] | None = None,
             checksums: bool = True) -> list[str]:
    """What is wrong with the files ``names`` (default: all recorded), one message each."""
    found = []
    for name in sorted(recorded if names is None else names):
        expected = recorded[name]
        path = checkpoint / name
        if not path.is_file():
            found.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            found.append(f"{path}: {size} bytes, {expected['bytes']} recorded at commit (truncated or rewritten)")
        elif checksums and file_digest(path)["crc32"] != expected["crc32"]:
            found.append(f"{path}: checksum differs from the one recorded at commit (altered)")
    return found
