"""The worker: set up FSDP2 training, resume from the shared checkpoint, train, checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from trainer.agent import read_failure
from trainer.checkpoint.app_state import AppState, Progress, init_optimizer_state
from trainer.checkpoint.layout import ensure_writable
from trainer.checkpoint.lock import JobLock
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.settings import CheckpointSettings, RunIdentity
from trainer.config import TrainConfig
from trainer.data import SyntheticData, rank_slice
from trainer.distributed import Runtime, init_runtime, on_primary, shutdown
from trainer.errors import UserError
from trainer.metrics import MetricsWriter, read_metrics
from trainer.models import build_model, per_sample_loss
from trainer.phases import PhaseClock, what_it_recovered_from
from trainer.preemption import EXIT_PEER_PREEMPTED, StopRequest, exit_when_orphaned
from trainer.progress import StepReporter
from trainer.seeding import load_initial_weights

log = logging.getLogger("fsdp_train")


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over the decay horizon."""
    horizon = max(cfg.decay_steps or cfg.max_steps, 1)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_id_from_env() -> str:
    return os.environ.get("FSDP_TRAIN_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex


class Trainer:
    """One rank of the job: FSDP2 training on a fixed global batch, checkpointed by its manager.

    Global-batch semantics: step ``s`` consumes samples ``[samples_seen, samples_seen +
    global_batch_size)``, split as evenly as possible over the ranks, and each rank scales its
    summed loss by ``world_size / global_batch_size``. FSDP2 averages gradients over ranks, so
    the update is the single-process global-batch update whatever the world size, and a resume
    at another world size continues the same trajectory.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.stop = StopRequest()
        self.progress = Progress()
        self.clock = PhaseClock()

    # ---- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        """Join the job, build and shard the model, resume. Until the loop starts, a stop request
        ends the worker at once: the state is still the checkpoint's."""
        cfg, clock = self.cfg, self.clock
        self.stop.exit_at_once()
        if "TORCHELASTIC_RUN_ID" in os.environ:
            exit_when_orphaned()
        self.rt: Runtime = init_runtime(cfg.device, cfg.collective_timeout)
        cfg.check_world_size(self.rt.world_size)
        clock.lap("init_process_group")
        on_primary(self.rt, ensure_writable, cfg.checkpoint_dir)
        self.run_id = run_id_from_env()
        self.lock = JobLock(Path(cfg.checkpoint_dir), self.run_id, cfg.lock_ttl)
        on_primary(self.rt, self.lock.acquire)
        clock.lap("lock")

        self.model = build_model(cfg).to(self.rt.device)
        clock.lap("build_model")
        for unit in self.model.shard_units():
            fully_shard(unit)
        fully_shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(cfg, s))
        init_optimizer_state(self.optimizer)
        self.app_state = AppState(self.model, self.optimizer, self.scheduler, self.progress, cfg.seed)
        clock.lap("shard")
        self.checkpoints = CheckpointManager(CheckpointSettings.from_config(cfg), self.rt, self.app_state,
                                             RunIdentity.from_config(cfg, self.run_id))
        if self.checkpoints.start() is None and cfg.init_from:
            load_initial_weights(self.model, cfg.init_from)
        clock.record(self.checkpoints.start_phases)
        self.first_step = self.progress.step  # where this run segment starts
        self.data = SyntheticData(cfg)
        self.metrics = MetricsWriter(cfg.checkpoint_dir, enabled=self.rt.is_primary)
        self.reporter = StepReporter(cfg, self.rt.is_primary, self.progress.step)

    def _record_start(self) -> None:
        """The ``start`` record: where this run segment began, what it recovered from, and how long
        each start-up phase took."""
        if not self.rt.is_primary:
            return
        resumed = self.checkpoints.resumed
        marker = resumed.info.marker if resumed else None
        recovered = what_it_recovered_from(resumed and resumed.info.step, marker and marker.reason.value,
                                           marker and marker.world_size, self.rt.world_size,
                                           read_metrics(self.cfg.checkpoint_dir), read_failure())
        resumed_from = self.checkpoints.resumed_from
        self.metrics.event("start", step=self.first_step, world_size=self.rt.world_size, run_id=self.run_id,
                           resumed_from=resumed_from and dataclasses.asdict(resumed_from),
                           recovered_from=recovered, max_steps=self.cfg.max_steps, phases=self.clock.phases)

    # ---- one step -----------------------------------------------------------------------
    def train_step(self) -> tuple[float, bool]:
        """One optimizer step on the global batch; returns (global mean loss, stop agreed)."""
        cfg, rt = self.cfg, self.rt
        step = self.progress.step + 1
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # any randomness comes from (seed, step), never rank
        start, stop = rank_slice(cfg.global_batch_size, rt.world_size, rt.rank)
        inputs, targets = self.data.batch(self.progress.samples_seen + start, stop - start)
        inputs, targets = inputs.to(rt.device), targets.to(rt.device)
        losses = per_sample_loss(cfg.model, self.model(inputs), targets)
        (losses.sum() * (rt.world_size / cfg.global_batch_size)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step = step
        self.progress.samples_seen += cfg.global_batch_size
        totals = torch.stack([losses.detach().sum().float(),
                              torch.tensor(float(self.stop.requested), device=rt.device)])
        dist.all_reduce(totals)  # the loss for the record, and whether any rank was told to stop
        return totals[0].item() / cfg.global_batch_size, bool(totals[1].item() > 0)

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Train to ``max_steps``, checkpointing as the manager's policy says; a stop request
        any rank received ends the run with an emergency checkpoint of the last step."""
        max_steps, loss = self.cfg.max_steps, None
        self.stop.install()
        if self.progress.step >= max_steps:
            self._record_start()
        while self.progress.step < max_steps:
            loss, stop_agreed = self.train_step()
            step = self.progress.step
            if "first_step" not in self.clock.phases:
                self.clock.lap("first_step")
                self._record_start()
            self.reporter.step(step, loss, self.rt.world_size, self.scheduler.get_last_lr()[0], self.metrics)
            if stop_agreed:
                return self._stop_with_checkpoint(step, loss)
            self.checkpoints.maybe_save(step, loss, final=step == max_steps)
        self.checkpoints.maybe_save(self.progress.step, loss, final=True)  # no step ran: max_steps 0, or resumed there
        self.metrics.event("end", step=self.progress.step, world_size=self.rt.world_size)
        self.reporter.close()
        return 0

    def _stop_with_checkpoint(self, step: int, loss: float) -> int:
        self.stop.start_deadline(self.cfg.shutdown_grace)
        if self.rt.is_primary:
            log.warning("stop requested (%s): writing emergency checkpoint at step %d",
                        self.stop.signal_name or "by a peer", step)
        self.checkpoints.save_preempted(step, loss)
        self.stop.cancel_deadline()
        self.metrics.event("preempted", step=step, world_size=self.rt.world_size, signal=self.stop.signal_name)
        self.reporter.close()
        return 0 if self.stop.requested else EXIT_PEER_PREEMPTED

    def close(self) -> None:
        self.checkpoints.close()
        if self.rt.is_primary:
            self.lock.release()
        shutdown()


def configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(cfg: TrainConfig) -> int:
    configure_logging(int(os.environ.get("RANK", "0")))
    trainer = Trainer(cfg)
    started = time.perf_counter()
    try:
        trainer.setup()
        code = trainer.run()
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fsdp-train: error: {exc}", file=sys.stderr)
        return 2
    trainer.close()
    log.info("done in %.1fs", time.perf_counter() - started)
    return code
