"""The checkpoint manager: the one object the trainer talks to about checkpoints."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from trainer.checkpoint.app_state import STATE_KEY, AppState
from trainer.checkpoint.failures import root_cause
from trainer.checkpoint.interval import AutoInterval, FailureHistory, FixedInterval
from trainer.checkpoint.layout import committed_checkpoints, delete_step_dir, step_dir
from trainer.checkpoint.marker import CommitMarker, Lineage, SaveReason
from trainer.checkpoint.memory_tier import MemoryRestore, MemoryTier, config_digest
from trainer.checkpoint.planner import new_save_planner
from trainer.checkpoint.records import ItemRecords
from trainer.checkpoint.resume import Resumed, resume, verify_readable
from trainer.checkpoint.retention import apply_retention
from trainer.checkpoint.save_thread import save_thread
from trainer.checkpoint.settings import CheckpointSettings, RunIdentity, SaveMode, WriterKind
from trainer.checkpoint.staging import ReusableHostStager
from trainer.checkpoint.storage import CommittingWriter, new_storage_writer
from trainer.checkpoint.writer_client import WriterClient, WriterProcessDied, start_on_every_rank
from trainer.distributed.runtime import Runtime, on_primary
from trainer.errors import UserError

log = logging.getLogger("fsdp_train")

# --snapshot-every auto re-evaluates its interval every this many snapshots (each time, a collective)
SNAPSHOT_EVALUATE_EVERY = 10


class CheckpointManager:
    """Owns a job's checkpoints: where it resumes from, when it saves, how, and what it keeps.

    The trainer calls ``start`` once (resume, then get the writers ready), ``maybe_save`` after
    every step, ``save_preempted`` when the job is told to stop, and ``close``. The policy:
    - a periodic save every ``every`` steps (or when ``interval.AutoInterval`` says, for ``auto``),
      asynchronous unless the mode is ``sync``: the state
      is staged into reusable host buffers (the only blocking part) and written by the save
      thread, or by the writer process it hands the save to; at most one is in flight;
    - with ``first_step``, a synchronous save right after step 1, read back at once;
    - the final and the emergency save are synchronous;
    - a step already committed (or resumed from) is never saved again.
    - with a snapshot folder (the agent's), a memory snapshot every ``snapshot_every`` steps, and a
      start that restores from those snapshots when every rank can (``memory_tier``), else from disk.
    A failed periodic save is logged, its partial directory removed, and training goes on; a dead
    writer process stops the job, as a lost rank would. Retention runs on the save thread after
    each commit, so no save waits for old checkpoints to be deleted.
    """

    def __init__(self, settings: CheckpointSettings, runtime: Runtime, app_state: AppState,
                 identity: RunIdentity, failures: FailureHistory | None = None) -> None:
        """``failures``: the job's failure history so far, which ``auto`` needs (the trainer reads it
        from the job's start records; None: none seen, this start the first)."""
        self.settings = settings
        self.rt = runtime
        self.app_state = app_state
        self.identity = identity
        self.failures = failures
        self.resumed: Resumed | None = None  # the disk checkpoint this start restored
        self.memory_restore: MemoryRestore | None = None  # or the memory snapshots it restored
        self.memory: MemoryTier | None = None
        if settings.snapshot_folder is not None and settings.snapshot_every != 0:
            self.memory = MemoryTier(settings.snapshot_folder, runtime, identity.run_id,
                                     config_digest(identity.config, identity.dataset), self._snapshot_interval())
        self._stager = ReusableHostStager()
        self._thread = save_thread()
        self._writer_process: WriterClient | None = None  # writes async saves when it runs, else the thread does
        self._records = ItemRecords()  # the items' torch.save records, reused by every save
        self._planner = new_save_planner()
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._last_saved_step: int | None = None
        self.start_phases: dict[str, float | dict[str, float]] = {}
        self._writers_ready: Future | None = None  # the writer processes' start, on the save thread
        self.interval: FixedInterval | AutoInterval = FixedInterval(settings.every or 1)
        self._left_maybe_save: float | None = None  # when the last maybe_save returned: a step runs after it

    def _failure_history(self) -> FailureHistory:
        return self.failures or FailureHistory.from_records([], time.time())

    def _snapshot_interval(self) -> FixedInterval | AutoInterval:
        if self.settings.snapshot_every is not None:
            return FixedInterval(self.settings.snapshot_every)
        return AutoInterval(self.settings.expected_mtbf, self._failure_history(), self._agree_max,
                            announce=self.rt.is_primary, what="memory snapshot", first_every=1,
                            evaluate_every=SNAPSHOT_EVALUATE_EVERY)

    @property
    def root(self) -> Path:
        return self.settings.directory

    @property
    def resumed_from(self) -> Lineage | None:
        if self.memory_restore is not None:
            return Lineage(self.memory_restore.step, self.memory_restore.world_size)
        return self.resumed.lineage if self.resumed else None

    @property
    def restored_from(self) -> str | None:
        """Which tier this start restored from: ``memory``, ``disk``, or None (a fresh start)."""
        return "memory" if self.memory_restore else "disk" if self.resumed else None

    # ---- life cycle ---------------------------------------------------------------------
    def start(self) -> Resumed | None:
        """Resume from the newest intact checkpoint (or the one asked for), then get the writers ready:
        the first async save costs what later ones do. None means a fresh start. ``start_phases``
        then holds how long each part took."""
        started = time.perf_counter()
        explicit = self.settings.resume_from is not None or self.settings.no_resume
        if self.memory is not None and not explicit:
            newest = on_primary(self.rt, _newest_committed_step, self.root)
            self.memory_restore = self.memory.restore(self.app_state, newest)
            self._last_saved_step = newest
        if self.memory_restore is None:
            self.resumed = resume(self.settings, self.rt, self.app_state, self.identity.shape)
        if self.resumed is not None:
            self._last_saved_step = self.resumed.info.step
        if self.settings.every is None:
            failures = self._failure_history()
            if self.memory is not None:  # what memory covers is no longer the disk tier's to cover
                failures = failures.beyond_memory()
            self.interval = AutoInterval(self.settings.expected_mtbf, failures, self._agree_max,
                                         announce=self.rt.is_primary)
        resumed_at = time.perf_counter()
        self._start_writers()
        self.start_phases = {"restore": resumed_at - started, "writer_start": time.perf_counter() - resumed_at,
                             **({"restore_parts": self.resumed.phases} if self.resumed else {})}
        return self.resumed

    def _start_writers(self) -> None:
        """Staging now (it copies the live state); the writer processes on the save thread, so the
        first step does not wait for them: every save waits for ``_writers_ready`` first."""
        if self.settings.mode == SaveMode.ASYNC:
            self._stager.prepare({STATE_KEY: self.app_state.state_dict()})
            if self.settings.writer == WriterKind.PROCESS:
                self._writers_ready = self._thread.submit(self._start_writer_processes)
            else:
                self._thread.submit(lambda: None)  # the thread starts (and lowers its priority) now
        if self.rt.is_primary:
            self._retain()

    def _start_writer_processes(self) -> None:
        self._writer_process = start_on_every_rank(self.rt, self._stager)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown()  # after what is queued on it: the writers' start, retention
            if self._writer_process is not None:
                self._writer_process.close()
            self._stager.close()

    # ---- the save policy ----------------------------------------------------------------
    def maybe_save(self, step: int, loss: float | None, *, final: bool = False) -> None:
        """Save after ``step`` if the policy says so; ``final`` marks the run's last step."""
        entered = time.perf_counter()
        if self._left_maybe_save is not None:
            writing = self._pending is not None and not self._pending.done()
            self.interval.step_finished(entered - self._left_maybe_save, writing=writing)
        if self.memory is not None:
            step_s = None if self._left_maybe_save is None else entered - self._left_maybe_save
            self.memory.maybe_take(step, self.app_state, step_s)
        if step == 1 and self.settings.first_step:
            self.save(step, loss, SaveReason.FIRST_STEP, blocking=True)
            verify_readable(self.rt, self.root, step)
        elif final:
            self.save(step, loss, SaveReason.FINAL, blocking=True)
        elif self.interval.due(step, self._last_saved_step):
            self.save(step, loss, SaveReason.PERIODIC, blocking=False)
            self.interval.saved(step, time.perf_counter() - entered)
        self._left_maybe_save = time.perf_counter()

    def _agree_max(self, values: tuple[float, ...]) -> tuple[float, ...]:
        """The maximum of ``values`` over all ranks, so every rank makes the same interval choice."""
        if not dist.is_initialized():
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # the training group: the save thread uses the other
        return tuple(tensor.tolist())

    def save_preempted(self, step: int, loss: float | None) -> None:
        """The emergency save after a stop request: synchronous, of the last completed step."""
        self.save(step, loss, SaveReason.PREEMPTED, blocking=True)

    # ---- the save mechanism -------------------------------------------------------------
    def save(self, step: int, loss: float | None, reason: SaveReason, *, blocking: bool) -> None:
        """Save the state after ``step`` now (``maybe_save`` decides when; benchmarks call this directly)."""
        if self._writers_ready is not None:  # its collectives and a save's share the checkpoint group
            self._writers_ready.result()
        self.wait()
        if step == self._last_saved_step:
            return  # this exact state is already committed (e.g. a final save right after a periodic one)
        self._last_saved_step = step
        path, draft = step_dir(self.root, step), self._draft(step, loss, reason)
        if blocking or self.settings.mode == SaveMode.SYNC:
            try:
                dcp.save({STATE_KEY: self.app_state}, storage_writer=self._storage_writer(path, draft),
                         planner=self._planner, process_group=self.rt.checkpoint_group)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any storage failure, one line
                raise UserError(f"{self._discard_failed(step, exc)}; fix the volume (space, permissions) "
                                "and re-run to resume") from None
            return
        staged = self._stager.stage({STATE_KEY: self.app_state.state_dict()})  # the only blocking part
        self._pending = self._thread.submit(self._write_staged, staged, path, draft)
        self._pending_step = step

    def wait(self) -> None:
        """Finish the in-flight save; a failed one is logged and training goes on."""
        if self._pending is None:
            return
        pending, step = self._pending, self._pending_step
        self._pending = self._pending_step = None
        try:
            pending.result()
        except WriterProcessDied as exc:  # its group is broken: restart the job, as for a lost rank
            raise UserError(f"{self._discard_failed(step, exc)}; stopping so the job restarts from it") from None
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a failed save must not stop training
            message = self._discard_failed(step, exc)
            if self.rt.is_primary:
                log.error("%s; training continues", message)

    def settle(self) -> None:
        """Wait for the in-flight save and for the retention queued after it."""
        self.wait()
        self._thread.submit(lambda: None).result()

    def _draft(self, step: int, loss: float | None, reason: SaveReason) -> CommitMarker:
        world = self.rt.world_size
        return CommitMarker(step=step, world_size=world, reason=reason, run_id=self.identity.run_id, loss=loss,
                            resumed_from=self.resumed_from, shape=self.identity.shape, config=self.identity.config,
                            dataset=self.identity.dataset,
                            sharding=f"FSDP2 fully_shard, dim-0 shards over {world} rank(s)")

    def _storage_writer(self, path: Path, draft: CommitMarker) -> CommittingWriter:
        return new_storage_writer(path, draft, on_commit=self._after_commit if self.rt.is_primary else None,
                                  records=self._records)

    def _write_staged(self, staged: dict[str, Any], path: Path, draft: CommitMarker) -> None:
        """The background half of an async save, on the save thread: in the writer process when there is one."""
        if self._writer_process is None:
            dcp.save(staged, storage_writer=self._storage_writer(path, draft), planner=self._planner,
                     process_group=self.rt.checkpoint_group)
            return
        committed = self._writer_process.save(self._stager, staged, path, draft)
        if committed is not None and self.rt.is_primary:
            self._after_commit(committed)

    def _discard_failed(self, step: int, exc: BaseException) -> str:
        """Remove the partial directory (rank 0) and return the one-line reason."""
        message = f"checkpoint at step {step} failed ({root_cause(exc)}); the previous committed checkpoint is intact"
        if self.rt.is_primary:
            delete_step_dir(step_dir(self.root, step))
        return message

    def _after_commit(self, marker: CommitMarker) -> None:
        """Log the commit and queue retention on the save thread: deleting old checkpoints is not
        part of making this one durable, so neither ``wait`` nor a synchronous save includes it."""
        log.info("checkpoint step %d committed (%.1f MB, %.2fs, %s)", marker.step, marker.bytes / 1e6,
                 marker.save_seconds, marker.reason.value)
        self._thread.submit(self._retain_logging_failures)

    def _retain(self) -> None:
        resumed_step = self.resumed.info.step if self.resumed else None
        apply_retention(self.root, self.settings.keep_last, resumed_step)

    def _retain_logging_failures(self) -> None:
        try:
            self._retain()
        except Exception as exc:  # noqa: BLE001 - older checkpoints stay; the next commit tries again
            log.warning("retention failed (%s); older checkpoints are kept for now", root_cause(exc))


def _newest_committed_step(root: Path) -> int | None:
    committed = committed_checkpoints(root)
    return committed[-1].step if committed else None
