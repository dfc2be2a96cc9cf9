"""The worker: set up FSDP2 training, resume from the shared checkpoint, train, checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from trainer.checkpoint.app_state import AppState, Progress, init_optimizer_state
from trainer.checkpoint.interval import FailureHistory
from trainer.checkpoint.layout import ensure_writable
from trainer.checkpoint.lock import JobLock
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.settings import CheckpointSettings, RunIdentity
from trainer.config import AUTO, TrainConfig, is_hf
from trainer.data.loader import Prefetcher, TrainingData, check_same_data, rank_slice
from trainer.distributed.failure_file import read_failure
from trainer.distributed.preemption import EXIT_PEER_PREEMPTED, StopRequest, exit_when_orphaned
from trainer.distributed.runtime import Runtime, init_runtime, on_primary, run_id, shutdown
from trainer.errors import UserError
from trainer.metrics.phases import PhaseClock, what_it_recovered_from
from trainer.metrics.progress import StepReporter
from trainer.metrics.records import MetricsWriter, read_metrics
from trainer.models.build import build_model, per_sample_loss
from trainer.models.init_weights import load_initial_weights
from trainer.models.sharding import recompute_activations, shard_units
from trainer.optim.schedule import new_scheduler, rebase, setting_changes

log = logging.getLogger("fsdp_train")

# FSDP2 warns when a sharded module returns a view (nn.Linear on a [batch, seq, width] input does): an
# in-place op on that view would skip its pre-backward hook. The step only reads the output (logits_of,
# then an out-of-place loss), so the warning, once per rank for most models, says nothing here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def mixed_precision_policy(mode: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters and compute, fp32 gradient reduction; the sharded weights stay fp32."""
    if mode == "none":
        return MixedPrecisionPolicy()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed-precision bf16: {torch.cuda.get_device_name(device)} has no bf16; pass "
                        "--mixed-precision none")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def micro_batches(count: int, size: int | None, most: int) -> list[tuple[int, int]]:
    """[lo, hi) spans of at most ``size`` samples covering ``count``, as even as possible. Every rank
    runs the same number of them, enough for the largest share (``most``), so the collectives FSDP2
    issues per forward and backward pair up across ranks; a rank with fewer samples than spans
    gets an empty one (lo == hi), which it runs as a zero-weight repeat of a sample."""
    parts = -(-most // size) if size else 1
    base, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return list(zip(bounds, bounds[1:]))


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float | None:
    """Clip to ``max_norm`` by the global norm over every shard; returns that norm (None: off)."""
    if not max_norm:
        return None
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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
        self.data = TrainingData(cfg)  # bad data fails here, before anything is written
        if "TORCHELASTIC_RUN_ID" in os.environ:
            exit_when_orphaned()
        self.rt: Runtime = init_runtime(cfg.device, cfg.collective_timeout)
        cfg.check_world_size(self.rt.world_size)
        self.largest_share = -(-cfg.global_batch_size // self.rt.world_size)  # rank 0's, the largest
        self.policy = mixed_precision_policy(cfg.mixed_precision, self.rt.device)
        clock.lap("init_process_group")
        on_primary(self.rt, ensure_writable, cfg.checkpoint_dir)
        self.run_id = run_id()
        self.lock = JobLock(Path(cfg.checkpoint_dir), self.run_id, cfg.lock_ttl)
        on_primary(self.rt, self.lock.acquire)
        clock.lap("lock")

        self.model = build_model(cfg).to(self.rt.device)
        clock.lap("build_model")
        for unit in shard_units(self.model, cfg.shard_modules, cfg.model):
            if cfg.activation_checkpointing == "full":
                recompute_activations(unit)
            if cfg.compile:
                unit.compile()  # in place: the state dict keeps its keys
            fully_shard(unit, mp_policy=self.policy)
        fully_shard(self.model, mp_policy=self.policy)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = new_scheduler(self.optimizer, cfg)
        init_optimizer_state(self.optimizer)
        self.app_state = AppState(self.model, self.optimizer, self.scheduler, self.progress, cfg.seed)
        clock.lap("shard")
        fingerprint = self.data.info.fingerprint() if self.data.info else None
        # this job's earlier records: the start record and auto's failure history read them
        needs_records = self.rt.is_primary or AUTO in (cfg.checkpoint_every, cfg.snapshot_every)
        self.job_records = read_metrics(cfg.checkpoint_dir) if needs_records else []
        self.checkpoints = CheckpointManager(CheckpointSettings.from_config(cfg), self.rt, self.app_state,
                                             RunIdentity.from_config(cfg, self.run_id, fingerprint),
                                             FailureHistory.from_records(self.job_records, time.time()))
        resumed = self.checkpoints.start()  # from disk; or from memory (same run: same settings and data)
        if self.checkpoints.restored_from is None and cfg.init_from:
            load_initial_weights(self.model, cfg.init_from, hf_names=is_hf(cfg.model))
        self.changes: list[str] = []
        if resumed is not None:
            marker = resumed.info.marker
            check_same_data(cfg, marker.dataset, fingerprint)
            self.changes = setting_changes(marker.config, cfg, self.progress.step, marker.dataset, fingerprint)
            for change in self.changes if self.rt.is_primary else ():
                log.warning("resumed with another setting: %s", change)
        if self.checkpoints.restored_from is not None:
            rebase(self.optimizer, self.scheduler, cfg)
        clock.record(self.checkpoints.start_phases)
        self.first_step = self.progress.step  # where this run segment starts
        self.loader = Prefetcher(self.data.train)
        self.metrics = MetricsWriter(cfg.checkpoint_dir, enabled=self.rt.is_primary, tensorboard=cfg.tensorboard)
        self.reporter = StepReporter(cfg, self.rt.is_primary, self.progress.step)

    def _record_start(self) -> None:
        """The ``start`` record: where this run segment began, what it recovered from, and how long
        each start-up phase took."""
        if not self.rt.is_primary:
            return
        checkpoints = self.checkpoints
        lineage, marker = checkpoints.resumed_from, checkpoints.resumed and checkpoints.resumed.info.marker
        reason = "snapshot" if checkpoints.memory_restore else marker and marker.reason.value
        recovered = what_it_recovered_from(lineage and lineage.step, reason, lineage and lineage.world_size,
                                           self.rt.world_size, self.job_records, read_failure())
        self.metrics.event("start", step=self.first_step, world_size=self.rt.world_size, run_id=self.run_id,
                           resumed_from=lineage and dataclasses.asdict(lineage),
                           restored_from=checkpoints.restored_from,
                           recovered_from=recovered, max_steps=self.cfg.max_steps, phases=self.clock.phases,
                           setting_changes=self.changes)

    # ---- one step -----------------------------------------------------------------------
    def train_step(self) -> tuple[float, bool]:
        """One optimizer step on the global batch; returns (global mean loss, stop agreed)."""
        cfg, rt = self.cfg, self.rt
        step = self.progress.step + 1
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # any randomness comes from (seed, step), never rank
        start, stop = rank_slice(cfg.global_batch_size, rt.world_size, rt.rank)
        first = self.progress.samples_seen + start
        inputs, targets = self.loader.batch(first, stop - start)
        self.loader.fetch_ahead(first + cfg.global_batch_size, stop - start)
        loss_sum = torch.zeros((), device=rt.device)
        chunks = micro_batches(stop - start, cfg.micro_batch_size, self.largest_share)
        for index, (lo, hi) in enumerate(chunks):
            self.model.set_requires_gradient_sync(index == len(chunks) - 1)  # reduce once, after the last
            losses = self._losses(inputs, targets, lo, hi)
            (losses.sum() * (rt.world_size / cfg.global_batch_size)).backward()
            loss_sum += losses.detach().sum().float()
        self.grad_norm = clip_gradients(self.model, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step = step
        self.progress.samples_seen += cfg.global_batch_size
        totals = torch.stack([loss_sum, torch.tensor(float(self.stop.requested), device=rt.device)])
        dist.all_reduce(totals)  # the loss for the record, and whether any rank was told to stop
        return totals[0].item() / cfg.global_batch_size, bool(totals[1].item() > 0)

    def _losses(self, inputs: torch.Tensor, targets: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Per-sample losses of samples [lo, hi); an empty span runs the first sample with weight 0."""
        device, span = self.rt.device, slice(lo, hi) if hi > lo else slice(0, 1)
        losses = per_sample_loss(self.cfg.model, self.model(inputs[span].to(device)), targets[span].to(device))
        return losses if hi > lo else losses * 0.0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss on the same ``eval_batches`` global batches of held-out samples every time."""
        cfg, rt = self.cfg, self.rt
        start, stop = rank_slice(cfg.global_batch_size, rt.world_size, rt.rank)
        total = torch.zeros((), device=rt.device)
        self.model.eval()
        for batch in range(cfg.eval_batches):
            inputs, targets = self.data.held_out.batch(batch * cfg.global_batch_size + start, stop - start)
            for lo, hi in micro_batches(stop - start, cfg.micro_batch_size, self.largest_share):
                total += self._losses(inputs, targets, lo, hi).sum().float()
        self.model.train()
        dist.all_reduce(total)
        return total.item() / (cfg.eval_batches * cfg.global_batch_size)

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
            extra = self.data.position(self.progress.samples_seen)
            if self.cfg.max_grad_norm:
                extra["grad_norm"] = self.grad_norm
            self.reporter.step(step, loss, self.rt.world_size, self.scheduler.get_last_lr()[0], self.metrics,
                               **extra)
            if self.cfg.eval_every and step % self.cfg.eval_every == 0 and self.data.held_out is not None:
                self.reporter.evaluation(step, self.evaluate(), self.metrics)
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
        self.loader.close()
        self.metrics.close()
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
