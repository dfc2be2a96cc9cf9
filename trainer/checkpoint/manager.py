"""Save, resume and retention policy for one training job.

Saves: periodic saves are asynchronous (stage into reusable host buffers, then
``dcp.save`` the copy in a long-lived writer process, or a writer thread, at the
lowest CPU priority, at most one in flight); the final and the emergency save are
synchronous.
Resume: newest committed checkpoint whose files still match their recorded sizes
and checksums, verified by all ranks in parallel.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from trainer.checkpoint import integrity
from trainer.checkpoint.app_state import STATE_KEY, AppState
from trainer.checkpoint.background import background_writer
from trainer.checkpoint.failures import root_cause
from trainer.checkpoint.layout import (
    CheckpointInfo,
    committed_checkpoints,
    list_checkpoints,
    open_checkpoint,
    remove_tree,
    resolve_resume_target,
    step_dir,
)
from trainer.checkpoint.planner import LayoutCachingSavePlanner
from trainer.checkpoint.range_reader import RangeReader
from trainer.checkpoint.records import ItemRecords
from trainer.checkpoint.staging import ReusableHostStager
from trainer.checkpoint.storage import CommittingWriter
from trainer.checkpoint.writer_child import Hello
from trainer.checkpoint.writer_process import WriterProcess, WriterProcessDied, WriterUnavailable
from trainer.config import TrainConfig
from trainer.distributed import Runtime, on_primary, store_address
from trainer.errors import UserError

log = logging.getLogger("fsdp_train")
MARKER_FORMAT = 1
SUPERSEDED_DIR = "superseded"
WRITER_GROUP_TIMEOUT = timedelta(minutes=30)  # a collective may wait while the slowest rank writes its shards


def shape_mismatch(expected: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """Describe differing model-shape settings, or None when compatible."""
    keys = sorted(set(expected) | set(recorded))
    diffs = [f"{k}={recorded.get(k)!r} in checkpoint vs {expected.get(k)!r} now"
             for k in keys if expected.get(k) != recorded.get(k)]
    return "; ".join(diffs) or None


def check_compatible(cfg: TrainConfig, info: CheckpointInfo) -> None:
    mismatch = shape_mismatch(cfg.shape_fields(), info.marker.get("shape", {}))
    if mismatch:
        raise UserError(f"checkpoint {info.path} has a different model shape ({mismatch}): "
                        "pass the same model flags, or --no-resume / another --checkpoint-dir to start fresh")


class CheckpointManager:
    def __init__(self, cfg: TrainConfig, runtime: Runtime, app_state: AppState, run_id: str) -> None:
        self.cfg = cfg
        self.rt = runtime
        self.app_state = app_state
        self.root = Path(cfg.checkpoint_dir)
        self.run_id = run_id
        self.resumed_from: dict[str, int] | None = None
        self.last_loss: float | None = None
        self.last_restore_seconds = 0.0
        self.restore_whole_items: list[str] = []  # tensors the last load read whole, not by row range
        self._stager = ReusableHostStager()
        self._writer = background_writer()
        self._process: WriterProcess | None = None  # writes async saves when it runs, else the writer thread does
        self._records = ItemRecords()  # the items' torch.save records, reused by every save
        self._planner = LayoutCachingSavePlanner()
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._last_saved_step: int | None = None

    # ---- saving -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Allocate staging buffers and start the writers now: the first async save costs what later ones do."""
        if self.cfg.checkpoint_mode == "async":
            self._stager.prepare({STATE_KEY: self.app_state.state_dict()})
            self._writer.submit(lambda: None).result()
            if self.cfg.checkpoint_writer == "process":
                self._process = self._start_writer_process()

    def _start_writer_process(self) -> WriterProcess | None:
        """A writer process on every rank, or on none: the writers' own group needs all of them."""
        prefix = on_primary(self.rt, lambda: f"fsdp-train/writers/{uuid.uuid4().hex}/")
        host, port = store_address()
        hello = Hello(self.rt.rank, self.rt.world_size, host, port, prefix, WRITER_GROUP_TIMEOUT.total_seconds())
        process: WriterProcess | None = None
        problems: list[str] = []
        try:
            process = WriterProcess(hello)
            process.map(self._stager)
        except (WriterUnavailable, WriterProcessDied) as exc:
            problems.append(f"rank {self.rt.rank}: {exc}")
        problems = self._gather_problems(problems)
        if problems:
            if process is not None:
                process.close()
            if self.rt.is_primary:
                log.warning("no checkpoint writer process (%s); async saves are written by a thread instead",
                            problems[0])
            return None
        return process

    def save(self, step: int, *, blocking: bool, reason: str) -> None:
        self.wait()
        if step == self._last_saved_step or (self.resumed_from and step == self.resumed_from["step"]):
            return  # this exact state is already committed (e.g. a final save right after a periodic one)
        self._last_saved_step = step
        path = step_dir(self.root, step)
        marker = {
            "format": MARKER_FORMAT,
            "step": step,
            "world_size": self.rt.world_size,
            "torch_version": torch.__version__,
            "resumed_from": self.resumed_from,
            "reason": reason,
            "run_id": self.run_id,
            "loss": self.last_loss,
            "sharding": f"FSDP2 fully_shard, dim-0 shards over {self.rt.world_size} rank(s)",
            "shape": self.cfg.shape_fields(),
            "config": self.cfg.to_dict(),
        }
        blocking = blocking or self.cfg.checkpoint_mode == "sync"
        if blocking:
            try:
                dcp.save({STATE_KEY: self.app_state}, storage_writer=self._storage_writer(path, marker),
                         planner=self._planner, process_group=self.rt.checkpoint_group)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any storage failure, one line
                raise UserError(f"{self._discard_failed(step, exc)}; fix the volume (space, permissions) "
                                "and re-run to resume") from None
            return
        staged = self._stager.stage({STATE_KEY: self.app_state.state_dict()})  # the only blocking part
        self._pending = self._writer.submit(self._write_staged, staged, path, marker)
        self._pending_step = step

    def _storage_writer(self, path: Path, marker: dict[str, Any]) -> CommittingWriter:
        return CommittingWriter(path, marker, on_commit=self._after_commit if self.rt.is_primary else None,
                                records=self._records)

    def _write_staged(self, staged: dict[str, Any], path: Path, marker: dict[str, Any]) -> None:
        """The background half of an async save, on the writer thread: in the writer process when there is one."""
        if self._process is None:
            dcp.save(staged, storage_writer=self._storage_writer(path, marker), planner=self._planner,
                     process_group=self.rt.checkpoint_group)
            return
        committed = self._process.save(self._stager, staged, path, marker)
        if committed is not None and self.rt.is_primary:
            self._after_commit(committed)

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

    def _discard_failed(self, step: int, exc: BaseException) -> str:
        """Remove the partial directory (rank 0) and return the one-line reason."""
        reason = root_cause(exc)
        message = f"checkpoint at step {step} failed ({reason}); the previous committed checkpoint is intact"
        if self.rt.is_primary:
            remove_tree(step_dir(self.root, step))
        return message

    def _after_commit(self, marker: dict[str, Any]) -> None:
        """Log the commit and queue retention on the writer thread: deleting old checkpoints
        (0.3 s for 1.5 GB on a local disk, longer on network volumes) is not part of making this
        one durable, so neither a save's ``wait`` nor a final or emergency save's stall includes it."""
        log.info("checkpoint step %d committed (%.1f MB, %.2fs, %s)", marker["step"], marker["bytes"] / 1e6,
                 marker["save_seconds"], marker["reason"])
        self._writer.submit(self._retain_logging_failures)

    def _retain_logging_failures(self) -> None:
        try:
            self.apply_retention()
        except Exception as exc:  # noqa: BLE001 - older checkpoints stay; the next commit tries again
            log.warning("retention failed (%s); older checkpoints are kept for now", root_cause(exc))

    def settle(self) -> None:
        """Wait for the in-flight save and for the retention queued after it."""
        self.wait()
        self._writer.submit(lambda: None).result()

    def apply_retention(self) -> None:
        """Keep the newest ``keep_last`` committed checkpoints, the resumed-from one, and drop stale partials."""
        checkpoints = list_checkpoints(self.root)
        committed = [info for info in checkpoints if info.committed]
        if not committed:
            return
        keep = {info.step for info in committed[-self.cfg.keep_last:]} | {committed[-1].step}
        if self.resumed_from is not None:
            keep.add(self.resumed_from["step"])
        newest = committed[-1].step
        for info in checkpoints:
            stale_partial = not info.committed and info.step < newest
            if (info.committed and info.step not in keep) or stale_partial:
                remove_tree(info.path)

    # ---- resuming -----------------------------------------------------------------------
    def _candidates(self) -> list[CheckpointInfo]:
        if self.cfg.no_resume:
            return []
        if self.cfg.resume_from is not None:
            return [resolve_resume_target(self.root, self.cfg.resume_from)]
        return list(reversed(committed_checkpoints(self.root)))

    def _local_problems(self, info: CheckpointInfo) -> list[str]:
        """This rank's part of a verification: every file's size, and the checksums of its share of the bytes."""
        return integrity.problems(info.path, info.marker["files"], self.rt.rank, self.rt.world_size)

    def _gather_problems(self, local: list[str]) -> list[str]:
        gathered: list[list[str]] = [[] for _ in range(self.rt.world_size)]
        dist.all_gather_object(gathered, local, group=self.rt.checkpoint_group)
        return sorted({problem for rank_problems in gathered for problem in rank_problems})

    def _verify(self, info: CheckpointInfo) -> list[str]:
        return self._gather_problems(self._local_problems(info))

    def verify_readable(self, step: int) -> None:
        """Re-read a just-committed checkpoint (all ranks): broken storage fails now, not at the first resume."""
        info = on_primary(self.rt, open_checkpoint, step_dir(self.root, step))
        problems = self._verify(info)
        if problems:
            raise UserError(f"--checkpoint-dir {self.root}: checkpoint step {step} did not read back intact "
                            f"({problems[0]}); check the volume")

    def restore(self) -> CheckpointInfo | None:
        """Load the checkpoint to resume from into the live model/optimizer, or return None."""
        started = time.perf_counter()
        candidates = on_primary(self.rt, self._candidates)
        damaged: list[str] = []
        for info in candidates:
            check_compatible(self.cfg, info)
            problems = self._verified_load(info)
            if problems:
                if self.cfg.resume_from is not None:
                    raise UserError(f"--resume-from {self.cfg.resume_from}: {problems[0]}; pick another checkpoint")
                if self.rt.is_primary:
                    log.warning("skipping damaged checkpoint step %d: %s", info.step, "; ".join(problems))
                damaged.append(f"step {info.step}")
                continue
            self.last_restore_seconds = time.perf_counter() - started
            self.resumed_from = {"step": info.step, "world_size": int(info.marker["world_size"])}
            if self.rt.is_primary and self.cfg.resume_from is not None:
                self._set_aside_newer(info.step)
            if self.rt.is_primary:
                log.info("resumed from step %d (written by world size %d) -> now world size %d, load %.2fs",
                         info.step, info.marker["world_size"], self.rt.world_size, self.last_restore_seconds)
            return info
        if damaged:  # the live state may hold parts of a damaged load: never train on from it
            raise UserError(f"no intact checkpoint in {self.root} (damaged: {', '.join(damaged)}); "
                            "restore the files, or pass --no-resume to start over")
        return None

    def _verified_load(self, info: CheckpointInfo) -> list[str]:
        """Load while checksumming in a background thread (one pass over the disk); return problems found.

        A damaged checkpoint can also make ``dcp.load`` itself fail; that counts as damage
        only when verification found a problem, otherwise the error is real and raised.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
            local = pool.submit(self._local_problems, info)
            load_error: BaseException | None = None
            try:
                reader = RangeReader(info.path)
                dcp.load({STATE_KEY: self.app_state}, storage_reader=reader, process_group=self.rt.checkpoint_group)
                self.restore_whole_items = reader.whole_items
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - judged below
                load_error = exc
            problems = self._gather_problems(local.result())
        if load_error is not None and not problems:
            raise load_error
        return problems

    def _set_aside_newer(self, step: int) -> None:
        """After rewinding to an older step, move newer checkpoints out of the resume path (kept, not deleted)."""
        newer = [info for info in list_checkpoints(self.root) if info.step > step]
        if not newer:
            return
        aside = self.root / SUPERSEDED_DIR / time.strftime("%Y%m%dT%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for info in newer:
            info.path.rename(aside / info.path.name)
        log.warning("rewound to step %d: moved %d newer checkpoint(s) to %s", step, len(newer), aside)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown()
            if self._process is not None:
                self._process.close()
            self._stager.close()
