"""The commit marker: ``commit.json``, the file that makes a step directory a checkpoint.

The manager drafts it (what the job knows before a save), the storage writer completes it
(files, sizes, checksums, timings) and writes it last, atomically, once every rank's files
are durable. Everything that reads checkpoints reads it through ``CommitMarker.from_json``:
resume, retention, ``ckpt list/show/verify``, ``status``, ``infer`` and the chart's test hook.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError

FORMAT_VERSION = 1  # of commit.json and the directory layout; readers refuse a newer one
MAX_MARKER_BYTES = 4 * 1024 * 1024  # a real marker is a few KB; a bigger file is not one
_HEX_DIGEST = re.compile(r"^[0-9a-f]{16}$")  # one XXH3-64


class SaveReason(str, Enum):
    PERIODIC = "periodic"  # every --checkpoint-every steps
    FINAL = "final"  # at --max-steps
    FIRST_STEP = "first-step"  # --checkpoint-first-step: after step 1, then read back
    PREEMPTED = "preempted"  # the emergency save after SIGTERM


@dataclass(frozen=True)
class Lineage:
    """The checkpoint a run segment started from."""

    step: int
    world_size: int


class MarkerError(ValueError):
    """A ``commit.json`` that is not one this project wrote (or a newer version of it)."""


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False,
             minimum: float | None = None) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise MarkerError(f"{key!r} is {_short(value)}")
    if minimum is not None and value < minimum:
        raise MarkerError(f"{key!r} is {value!r}, below {minimum}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_files(files: dict[str, Any]) -> int:
    """Every recorded file is a plain name in the checkpoint directory, with a size and checksums
    that fit it; returns the sizes' sum."""
    total = 0
    for name, entry in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise MarkerError(f"file name {_short(name)} is not a plain name inside the checkpoint")
        if not isinstance(entry, dict):
            raise MarkerError(f"file {name!r} is {_short(entry)}")
        size = _require(entry, "bytes", int, minimum=0)
        if "xxh3_64_blocks" in entry:
            block = _require(entry, "block_bytes", int, minimum=1)
            digests = _require(entry, "xxh3_64_blocks", list)
            if len(digests) != max(1, math.ceil(size / block)):
                raise MarkerError(f"file {name!r} has {len(digests)} block checksums for {size} bytes")
        else:
            digests = [_require(entry, "xxh3_64", str)]
        if not all(isinstance(digest, str) and _HEX_DIGEST.match(digest) for digest in digests):
            raise MarkerError(f"file {name!r} has a checksum that is not an XXH3-64")
        total += size
    return total


@dataclass(frozen=True)
class CommitMarker:
    step: int
    world_size: int
    reason: SaveReason
    run_id: str | None = None
    loss: float | None = None
    resumed_from: Lineage | None = None
    shape: dict[str, Any] = field(default_factory=dict)  # the model-shape settings (compared on resume)
    config: dict[str, Any] = field(default_factory=dict)  # the whole training config
    dataset: dict[str, Any] | None = None  # the token dataset's fingerprint (compared on resume); None: synthetic
    sharding: str | None = None
    torch_version: str = torch.__version__
    format: int = FORMAT_VERSION
    # Completed by the storage writer at commit:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {bytes, block_bytes, xxh3_64_blocks}
    bytes: int = 0
    created: float = 0.0
    save_seconds: float = 0.0

    def completed(self, files: dict[str, dict[str, Any]], created: float, save_seconds: float) -> CommitMarker:
        """This draft with what only the storage writer knows."""
        return dataclasses.replace(self, files=files, bytes=sum(entry["bytes"] for entry in files.values()),
                                   created=round(created, 3), save_seconds=round(save_seconds, 3))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reason"] = self.reason.value
        return data

    @classmethod
    def from_json(cls, data: Any) -> CommitMarker:
        """Parse a marker; ``MarkerError`` names the first field that is wrong."""
        if not isinstance(data, dict):
            raise MarkerError("not a JSON object")
        version = _require(data, "format", int, minimum=1)
        if version > FORMAT_VERSION:
            raise MarkerError(f"format {version} is newer than this fsdp-train reads ({FORMAT_VERSION}); upgrade it")
        try:
            reason = SaveReason(data.get("reason"))
        except ValueError:
            raise MarkerError(f"'reason' is {data.get('reason')!r}") from None
        resumed = _require(data, "resumed_from", dict, optional=True)
        files = _require(data, "files", dict)
        if _check_files(files) != _require(data, "bytes", int, minimum=0):
            raise MarkerError("'bytes' is not the sum of the files' sizes")
        return cls(
            step=_require(data, "step", int, minimum=0), world_size=_require(data, "world_size", int, minimum=1),
            reason=reason,
            run_id=_require(data, "run_id", str, optional=True),
            loss=_require(data, "loss", (int, float), optional=True),
            resumed_from=None if resumed is None else Lineage(_require(resumed, "step", int, minimum=0),
                                                              _require(resumed, "world_size", int, minimum=1)),
            shape=_require(data, "shape", dict, optional=True) or {},
            config=_require(data, "config", dict, optional=True) or {},
            dataset=_require(data, "dataset", dict, optional=True),
            sharding=_require(data, "sharding", str, optional=True),
            torch_version=_require(data, "torch_version", str), format=version, files=files,
            bytes=data["bytes"], created=float(_require(data, "created", (int, float), minimum=0)),
            save_seconds=float(_require(data, "save_seconds", (int, float), optional=True, minimum=0) or 0.0),
        )

    def shape_mismatch(self, expected: dict[str, Any]) -> str | None:
        """The model-shape settings that differ from ``expected``, described, or None."""
        keys = sorted(set(expected) | set(self.shape))
        diffs = [f"{k}={self.shape.get(k)!r} in checkpoint vs {expected.get(k)!r} now"
                 for k in keys if expected.get(k) != self.shape.get(k)]
        return "; ".join(diffs) or None


def require_same_shape(path: Path, marker: CommitMarker, expected: dict[str, Any]) -> None:
    """Refuse, in one line, to resume a checkpoint of another model shape."""
    mismatch = marker.shape_mismatch(expected)
    if mismatch:
        raise UserError(f"checkpoint {path} has a different model shape ({mismatch}): "
                        "pass the same model flags, or --no-resume / another --checkpoint-dir to start fresh")
