"""Resume: choose the checkpoint, load it while verifying it, and rewind when told to.

Candidates are the committed checkpoints, newest first (or the one ``--resume-from`` names).
Each is loaded into the live model and optimizer while a thread on every rank checksums
that rank's share of its files, so the disk is read once. A damaged one is skipped, or, when
it was named explicitly, refused. Resuming an older step than the newest moves the newer
checkpoints to ``superseded/`` (kept, out of the resume path).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from trainer.checkpoint import integrity
from trainer.checkpoint.app_state import STATE_KEY, AppState
from trainer.checkpoint.failures import user_error_inside
from trainer.checkpoint.layout import (
    SUPERSEDED_DIR,
    CheckpointInfo,
    committed_checkpoints,
    list_checkpoints,
    open_checkpoint,
    resolve_resume_target,
    step_dir,
)
from trainer.checkpoint.marker import Lineage, require_same_shape
from trainer.checkpoint.range_reader import new_storage_reader
from trainer.checkpoint.safe_read import METADATA_FILE, SafeLoadPlanner
from trainer.checkpoint.settings import CheckpointSettings
from trainer.distributed.runtime import Runtime, gather_union, on_primary
from trainer.errors import UserError

log = logging.getLogger("fsdp_train")


@dataclass
class Resumed:
    """The checkpoint a run resumed from, and what the load took."""

    info: CheckpointInfo
    seconds: float
    whole_items: list[str] = field(default_factory=list)  # tensors the load read whole, not by row range
    # seconds: choosing the checkpoint, then verifying and loading it (side by side: they overlap)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def lineage(self) -> Lineage:
        return Lineage(self.info.step, self.info.marker.world_size)


def resume(settings: CheckpointSettings, rt: Runtime, app_state: AppState, shape: dict) -> Resumed | None:
    """Load the checkpoint to resume from into ``app_state`` (all ranks), or return None for a fresh start."""
    started = time.perf_counter()
    candidates = on_primary(rt, _candidates, settings)
    phases = {"choose": time.perf_counter() - started, "verify": 0.0, "load": 0.0}
    damaged: list[str] = []
    for info in candidates:
        require_same_shape(info.path, info.marker, shape)
        problems, whole_items = _verified_load(rt, app_state, info, phases)
        if problems:
            if settings.resume_from is not None:
                raise UserError(f"--resume-from {settings.resume_from}: {problems[0]}; pick another checkpoint")
            if rt.is_primary:
                log.warning("skipping damaged checkpoint step %d: %s", info.step, "; ".join(problems))
            damaged.append(f"step {info.step}")
            continue
        resumed = Resumed(info, time.perf_counter() - started, whole_items, phases)
        if rt.is_primary:
            if settings.resume_from is not None:
                set_aside_newer(settings.directory, info.step)
            log.info("resumed from step %d (written by world size %d) -> now world size %d, load %.2fs",
                     info.step, info.marker.world_size, rt.world_size, resumed.seconds)
        return resumed
    if damaged:  # the live state may hold parts of a damaged load: never train on from it
        raise UserError(f"no intact checkpoint in {settings.directory} (damaged: {', '.join(damaged)}); "
                        "restore the files, or pass --no-resume to start over")
    return None


def _candidates(settings: CheckpointSettings) -> list[CheckpointInfo]:
    if settings.no_resume:
        return []
    if settings.resume_from is not None:
        return [resolve_resume_target(settings.directory, settings.resume_from)]
    return list(reversed(committed_checkpoints(settings.directory)))


def _local_problems(rt: Runtime, info: CheckpointInfo) -> list[str]:
    """This rank's part of a verification: every file's size, and the checksums of its share of the bytes."""
    return integrity.problems(info.path, info.marker.files, rt.rank, rt.world_size)


def _timed_problems(rt: Runtime, info: CheckpointInfo, phases: dict[str, float]) -> list[str]:
    started = time.perf_counter()
    try:
        return _local_problems(rt, info)
    finally:
        phases["verify"] += time.perf_counter() - started


def _verified_load(rt: Runtime, app_state: AppState, info: CheckpointInfo,
                   phases: dict[str, float]) -> tuple[list[str], list[str]]:
    """Load while checksumming in a background thread (one pass over the disk); return the problems
    found and the tensors read whole; add the seconds each took to ``phases``.

    A damaged checkpoint can also make ``dcp.load`` itself fail; that counts as damage
    only when verification found a problem, otherwise the error is real and raised.
    """
    whole_items: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
        local = pool.submit(_timed_problems, rt, info, phases)
        load_error: BaseException | None = None
        load_started = time.perf_counter()
        try:  # .metadata is verified against the marker before it is unpickled
            reader = new_storage_reader(info.path, info.marker.files.get(METADATA_FILE))
            dcp.load({STATE_KEY: app_state}, storage_reader=reader, planner=SafeLoadPlanner(info.path),
                     process_group=rt.checkpoint_group)
            whole_items = getattr(reader, "whole_items", [])
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - judged below
            load_error = exc
        phases["load"] += time.perf_counter() - load_started
        problems = gather_union(rt, local.result())
    if load_error is not None and not problems:
        refused = user_error_inside(load_error)  # a checkpoint that is not safe to open: one line, never run
        raise refused or load_error
    return problems, whole_items


def verify_readable(rt: Runtime, root: Path, step: int) -> None:
    """Re-read a just-committed checkpoint (all ranks): broken storage fails now, not at the first resume."""
    info = on_primary(rt, open_checkpoint, step_dir(root, step))
    problems = gather_union(rt, _local_problems(rt, info))
    if problems:
        raise UserError(f"--checkpoint-dir {root}: checkpoint step {step} did not read back intact "
                        f"({problems[0]}); check the volume")


def set_aside_newer(root: Path, step: int) -> None:
    """After rewinding to an older step, move newer checkpoints out of the resume path (kept, not deleted)."""
    newer = [info for info in list_checkpoints(root) if info.step > step]
    if not newer:
        return
    aside = root / SUPERSEDED_DIR / time.strftime("%Y%m%dT%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for info in newer:
        info.path.rename(aside / info.path.name)
    log.warning("rewound to step %d: moved %d newer checkpoint(s) to %s", step, len(newer), aside)
