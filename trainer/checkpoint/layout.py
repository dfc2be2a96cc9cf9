"""Where checkpoints live, how a committed one is told from a partial one, and how one is deleted.

``<root>/step-<8 digits>/`` holds DCP's files. It counts as a checkpoint only
once ``commit.json`` exists: rank 0 writes it atomically (temp file, fsync,
rename, fsync of the directory) after every rank's shards are durable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint.marker import MAX_MARKER_BYTES, CommitMarker, MarkerError
from trainer.errors import UserError

log = logging.getLogger("fsdp_train")
COMMIT_FILE = "commit.json"
DIGEST_SUFFIX = ".digest.json"
SUPERSEDED_DIR = "superseded"  # where a rewind (--resume-from an older step) moves newer checkpoints
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable(root: str | Path) -> None:
    """Create the checkpoint directory and prove it is writable before any training work is done."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--checkpoint-dir {root}: not writable ({exc.strerror}); "
                        "point it at a writable directory or volume") from None


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
    marker: CommitMarker | None

    @property
    def committed(self) -> bool:
        return self.marker is not None

    def damage(self) -> str | None:
        """What a glance shows is wrong with a committed checkpoint: a file its marker lists that is
        missing or not of the recorded size (``ckpt verify`` reads every byte; this reads none)."""
        for name, entry in sorted((self.marker.files if self.marker else {}).items()):
            try:
                size = (self.path / name).stat().st_size
            except OSError:
                return f"{name} missing"
            if size != entry["bytes"]:
                return f"{name} is {size} bytes, not {entry['bytes']}"
        return None

    def summary(self) -> dict[str, Any]:
        """One row of ``ckpt list --json``."""
        marker = self.marker
        resumed = marker and marker.resumed_from
        return {
            "step": self.step,
            "path": str(self.path),
            "committed": self.committed,
            "world_size": marker and marker.world_size,
            "bytes": marker.bytes if marker else _dir_bytes(self.path),
            "created": marker and marker.created,
            "resumed_from": resumed and {"step": resumed.step, "world_size": resumed.world_size},
            "reason": marker and marker.reason.value,
            "damaged": self.damage(),
        }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


def read_marker(path: Path) -> CommitMarker | None:
    """The directory's commit marker; None when it has none, or (with a warning) a malformed one."""
    marker_file = path / COMMIT_FILE
    try:
        with marker_file.open("rb") as source:
            text = source.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: unreadable (%s); treating %s as uncommitted", marker_file, exc.strerror, path.name)
        return None
    try:
        if len(text) > MAX_MARKER_BYTES:
            raise MarkerError(f"larger than {MAX_MARKER_BYTES >> 20} MiB")
        return CommitMarker.from_json(json.loads(text))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError and MarkerError too
        log.warning("%s: not a valid commit marker (%s); treating %s as uncommitted", marker_file, exc, path.name)
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
    return CheckpointInfo(int(match.group(1)) if match else marker.step, path, marker)


def resolve_resume_target(root: str | Path, spec: str) -> CheckpointInfo:
    """``--resume-from``: a step number under ``root``, or a checkpoint path."""
    if spec.isdigit():
        return open_checkpoint(step_dir(root, int(spec)))
    return open_checkpoint(spec)


def delete_step_dir(path: Path) -> None:
    """Delete a checkpoint directory, marker first so it can never look committed half-deleted.

    The one place step directories are deleted: retention, a failed save's partial files, and a
    save that replaces a crash's partial directory at the same step all come here."""
    marker = path / COMMIT_FILE
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)
