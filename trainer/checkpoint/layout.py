"""Where checkpoints live and how a committed one is told from a partial one.

``<root>/step-<8 digits>/`` holds DCP's files. It counts as a checkpoint only
once ``commit.json`` exists: rank 0 writes it atomically (temp file, fsync,
rename, fsync of the directory) after every rank's shards are durable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError

COMMIT_FILE = "commit.json"
DIGEST_SUFFIX = ".digest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so readers see the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as out:
        json.dump(payload, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    marker: dict[str, Any] | None

    @property
    def committed(self) -> bool:
        return self.marker is not None

    def summary(self) -> dict[str, Any]:
        marker = self.marker or {}
        return {
            "step": self.step,
            "path": str(self.path),
            "committed": self.committed,
            "world_size": marker.get("world_size"),
            "bytes": marker.get("bytes", _dir_bytes(self.path)),
            "created": marker.get("created"),
            "resumed_from": marker.get("resumed_from"),
            "reason": marker.get("reason"),
        }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / COMMIT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Every step directory under ``root``, oldest first, committed or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append(CheckpointInfo(int(match.group(1)), entry, read_marker(entry)))
    return sorted(found, key=lambda info: info.step)


def committed_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    return [info for info in list_checkpoints(root) if info.committed]


def open_checkpoint(path: str | Path) -> CheckpointInfo:
    """A committed checkpoint given its directory; a clear error otherwise."""
    path = Path(path)
    match = _STEP_DIR.match(path.name)
    marker = read_marker(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint directory; list them with 'fsdp-train ckpt list DIR'")
    if marker is None:
        raise UserError(f"{path}: not a committed checkpoint (no {COMMIT_FILE}); pick one from 'fsdp-train ckpt list'")
    return CheckpointInfo(int(match.group(1)) if match else int(marker["step"]), path, marker)


def resolve_resume_target(root: str | Path, spec: str) -> CheckpointInfo:
    """``--resume-from``: a step number under ``root``, or a checkpoint path."""
    if spec.isdigit():
        return open_checkpoint(step_dir(root, int(spec)))
    return open_checkpoint(spec)


def remove_tree(path: Path) -> None:
    """Delete a checkpoint directory, marker first so it can never look committed half-deleted."""
    marker = path / COMMIT_FILE
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)
