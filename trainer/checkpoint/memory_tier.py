"""The memory tier beside the disk tier: a snapshot per rank at its own cadence, and a start that
restores from those snapshots when, and only when, every rank can.

A start restores from memory only if all of these hold, agreed by every rank in one collective:
every rank holds a complete snapshot of the same step, written by this run, at this world size,
with this layout and these settings, and that step is not older than the newest committed disk
checkpoint. Otherwise it restores from disk, and rank 0 says why in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.checkpoint.app_state import AppState
from trainer.checkpoint.interval import AutoInterval, FixedInterval
from trainer.checkpoint.snapshot import Manifest, SnapshotSlots, Unsupported, flatten, layout_of
from trainer.distributed.runtime import Runtime

log = logging.getLogger("fsdp_train")


# Settings of how a run is operated, not of what it computes: a snapshot taken under other values of
# these is still the state this run would have reached (the checkpoint directory is the job's key
# already, in the snapshots' folder name).
OPERATIONAL = frozenset({
    "checkpoint_dir", "checkpoint_every", "expected_mtbf", "snapshot_every", "checkpoint_first_step",
    "checkpoint_mode", "checkpoint_writer", "keep_last", "resume_from", "no_resume", "log_every", "lock_ttl",
    "collective_timeout", "shutdown_grace", "progress", "tensorboard", "eval_every", "eval_batches"})


def config_digest(config: dict[str, Any], dataset: dict[str, Any] | None) -> str:
    """What a snapshot must have been taken under to be restored: every setting that decides the
    trajectory, and the dataset."""
    decisive = {key: value for key, value in config.items() if key not in OPERATIONAL}
    text = json.dumps({"config": decisive, "dataset": dataset}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class MemoryRestore:
    step: int
    world_size: int
    seconds: float


NO_SNAPSHOT = "holds no snapshot"


@dataclass(frozen=True)
class Offer:
    """One rank's answer to "which snapshots could you restore?"."""

    steps: tuple[int, ...]  # complete snapshots that match this run, world size, layout and settings
    problem: str | None  # why there is none, when there is none


class MemoryTier:
    """One rank's snapshots and their cadence: a ``FixedInterval`` (every K steps) or an
    ``AutoInterval`` (Young/Daly from the snapshots' own stall and the job's failures)."""

    def __init__(self, folder: Path, rt: Runtime, run_id: str, digest: str,
                 interval: FixedInterval | AutoInterval) -> None:
        self.slots = SnapshotSlots(folder, rt.rank)
        self.rt = rt
        self.run_id = run_id
        self.digest = digest
        self.interval = interval
        self.disabled: str | None = None  # why snapshots stopped (a state they cannot carry)
        self.last_step: int | None = None  # of the newest snapshot this process took

    def maybe_take(self, step: int, app_state: AppState, step_s: float | None = None) -> None:
        """After ``step``, which took ``step_s`` (without the saves and snapshots around it)."""
        if self.disabled:
            return
        if step_s is not None:
            self.interval.step_finished(step_s, writing=False)
        if not self.interval.due(step, self.last_step):
            return
        started = time.perf_counter()
        try:
            self.slots.take(app_state.state_dict(), step=step, world_size=self.rt.world_size, run_id=self.run_id,
                            config_digest=self.digest)
        except (Unsupported, OSError) as exc:
            self.disabled = str(exc)
            if self.rt.is_primary:
                log.warning("memory snapshots off: %s; failures restore from disk", exc)
            return
        self.last_step = step
        self.interval.saved(step, time.perf_counter() - started)

    # ---- restoring ------------------------------------------------------------------------
    def offer(self, app_state: AppState) -> tuple[Offer, dict[int, Manifest]]:
        complete = self.slots.complete()
        if not complete:
            return Offer((), NO_SNAPSHOT), {}
        _, live = flatten(app_state.state_dict())
        layout, steps, problems = layout_of(live), [], []
        for manifest in complete.values():
            if manifest.run_id != self.run_id:
                problems.append(f"holds a snapshot of another run ({manifest.run_id})")
            elif manifest.world_size != self.rt.world_size:
                problems.append(f"holds a snapshot written at world size {manifest.world_size}, not "
                                f"{self.rt.world_size}")
            elif manifest.config_digest != self.digest:
                problems.append("holds a snapshot taken under other settings")
            elif manifest.layout != layout:
                problems.append("holds a snapshot of another state layout")
            else:
                steps.append(manifest.step)
        usable = {slot: m for slot, m in complete.items() if m.step in steps and m.run_id == self.run_id}
        return Offer(tuple(sorted(steps)), None if steps else problems[0]), usable

    def restore(self, app_state: AppState, newest_disk_step: int | None) -> MemoryRestore | None:
        """Restore every rank from memory, or none (then say why on rank 0); a collective."""
        started = time.perf_counter()
        try:
            offer, usable = self.offer(app_state)
        except (Unsupported, OSError, ValueError) as exc:
            offer, usable = Offer((), f"cannot read its snapshots ({exc})"), {}
        offers: list[Offer | None] = [None] * self.rt.world_size
        dist.all_gather_object(offers, offer, group=self.rt.checkpoint_group)
        step, reason = agree(offers, newest_disk_step)
        if step is None:
            first_start = newest_disk_step is None and all(o is not None and o.problem == NO_SNAPSHOT for o in offers)
            if self.rt.is_primary and not first_start:  # a job's first start has nothing to say
                log.warning("restoring from disk, not memory: %s", reason)
            return None
        slot = next(slot for slot, manifest in usable.items() if manifest.step == step)
        try:
            app_state.load_state_dict(self.slots.restore(slot, usable[slot], app_state.state_dict()))
            problem = None
        except Exception as exc:  # noqa: BLE001 - any failure: these snapshots must never be tried again
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.slots.drop()
        problems: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(problems, problem, group=self.rt.checkpoint_group)
        failed = [(rank, why) for rank, why in enumerate(problems) if why]
        if failed:  # some ranks may have loaded already: start again, without the bad snapshots
            rank, why = failed[0]
            raise RuntimeError(f"restoring step {step} from memory failed on rank {rank} ({why}); its snapshots "
                               "are dropped and the workers restart from disk")
        seconds = time.perf_counter() - started
        if self.rt.is_primary:
            log.info("restored step %d from memory snapshots (world size %d) in %.3fs", step, self.rt.world_size,
                     seconds)
        return MemoryRestore(step, self.rt.world_size, seconds)


def agree(offers: list[Offer], newest_disk_step: int | None) -> tuple[int | None, str | None]:
    """The newest step every rank can restore, or None with the reason (the first one that applies)."""
    for rank, offer in enumerate(offers):
        if offer.problem is not None:
            return None, f"rank {rank} {offer.problem}"
    common = set(offers[0].steps).intersection(*(offer.steps for offer in offers[1:]))
    if not common:
        held = ", ".join(f"rank {rank}: {'/'.join(map(str, offer.steps))}" for rank, offer in enumerate(offers))
        return None, f"the ranks hold snapshots of different steps ({held})"
    step = max(common)
    if newest_disk_step is not None and step < newest_disk_step:
        return None, f"the snapshots (step {step}) are older than the newest checkpoint (step {newest_disk_step})"
    return step, None
