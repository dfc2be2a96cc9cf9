"""Training overhead of checkpointing: steps/s with an async checkpoint every 10 steps, and with a
memory snapshot after every step, vs neither.

``python -m bench.overhead [--pairs 30] [--config FILE] [--json FILE]`` trains the ``make train``
model (or ``--config``'s) on 2 CPU ranks in one torchrun job, in blocks of 10 steps. A third of the
blocks take one async checkpoint after their first step (what ``--checkpoint-every 10`` does), a
third a memory snapshot after each step (what ``--snapshot-every 1``, the default, does; in
``/dev/shm``), the rest neither; the kinds alternate in ABC CBA order. Separate runs of this job
differ by several percent on a shared machine, more than the effect measured, so all kinds are
sampled side by side in one run and machine drift hits them alike. Slowdown = 1 - (steps/s with) /
(steps/s without), over all blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.jobs import job_settings
from trainer.config import TrainConfig, setting_choices

ROOT = Path(__file__).resolve().parent.parent
BLOCK_STEPS = 10
WARMUP_STEPS = 20
KINDS = ("none", "every_10", "snapshots")


def _config(config: str | None, checkpoint_dir: Path, writer: str) -> TrainConfig:
    settings = job_settings(config)
    settings.update(checkpoint_dir=str(checkpoint_dir), max_steps=10**6, progress=False,
                    checkpoint_first_step=False, checkpoint_writer=writer)
    return TrainConfig(**settings)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: warm up, then time alternating blocks with and without a checkpoint."""
    import torch.distributed as dist

    from trainer.checkpoint.interval import FixedInterval
    from trainer.checkpoint.marker import SaveReason
    from trainer.checkpoint.memory_tier import MemoryTier
    from trainer.train import Trainer

    trainer = Trainer(_config(args.config, Path(args.work), args.writer))
    trainer.setup()
    memory = MemoryTier(Path(args.snapshots), trainer.rt, "bench", "bench", FixedInterval(1))
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    trainer.checkpoints.save(trainer.progress.step, None, SaveReason.PERIODIC, blocking=False)  # first-save costs
    trainer.checkpoints.wait()

    def block(kind: str) -> float:
        dist.barrier()
        started = time.perf_counter()
        for index in range(BLOCK_STEPS):
            trainer.train_step()
            if kind == "every_10" and index == 0:
                trainer.checkpoints.save(trainer.progress.step, None, SaveReason.PERIODIC, blocking=False)
            if kind == "snapshots":
                memory.maybe_take(trainer.progress.step, trainer.app_state)
        trainer.checkpoints.wait()  # a save's whole cost stays inside its own block
        return time.perf_counter() - started

    memory.maybe_take(trainer.progress.step, trainer.app_state)  # both slots' first-touch costs, as
    memory.maybe_take(trainer.progress.step, trainer.app_state)  # for the first save above
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for pair in range(args.pairs):
        for kind in KINDS if pair % 2 == 0 else reversed(KINDS):
            seconds[kind].append(block(kind))
    if trainer.rt.is_primary:  # ranks move in lockstep (an all-reduce every step): rank 0's clock serves
        Path(args.out).write_text(json.dumps(seconds))
    trainer.close()


def summarize(seconds: dict[str, list[float]]) -> dict:
    rates = {kind: BLOCK_STEPS * len(values) / sum(values) for kind, values in seconds.items()}
    slowdowns, quartiles = {}, {}
    for kind in KINDS[1:]:
        pairs = [1 - without / with_ for without, with_ in zip(seconds["none"], seconds[kind])]
        slowdowns[kind] = 1 - rates[kind] / rates["none"]
        quartiles[kind] = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    return {"steps_per_s": rates, "slowdown": slowdowns, "pair_slowdown_quartiles": quartiles,
            "pairs": len(seconds["none"]), "block_steps": BLOCK_STEPS, "block_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30,
                        help="rounds of 10-step blocks, one of each kind: none, a checkpoint, snapshots (default 30)")
    parser.add_argument("--writer", choices=setting_choices("checkpoint_writer"), default="process",
                        help="who writes the async saves, as --checkpoint-writer (default process)")
    parser.add_argument("--config", metavar="FILE", help="the job's settings (default configs/local.yaml)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.work:
        worker(args)
        return 0
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # where the memory tier keeps its snapshots
    with tempfile.TemporaryDirectory(prefix="fsdp-train-overhead-", dir=ROOT) as work, \
            tempfile.TemporaryDirectory(prefix="fsdp-train-overhead-", dir=shm) as snapshots:
        out = Path(work) / "blocks.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "bench.overhead", "--pairs", str(args.pairs), "--writer", args.writer,
                   "--work", str(Path(work) / "ckpt"), "--snapshots", snapshots, "--out", str(out),
                   *(["--config", args.config] if args.config else [])]
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = {**summarize(json.loads(out.read_text())), "writer": args.writer}
    rates = result["steps_per_s"]
    print(f"steps/s without checkpoints: {rates['none']:.2f}; with one every 10 steps: {rates['every_10']:.2f}; "
          f"slowdown {100 * result['slowdown']['every_10']:.1f}% (target <= 2%; {args.writer} writer)")
    print(f"steps/s with a memory snapshot after every step: {rates['snapshots']:.2f}; "
          f"slowdown {100 * result['slowdown']['snapshots']:.1f}% (target <= 2%)")
    for kind in KINDS[1:]:
        low, median, high = result["pair_slowdown_quartiles"][kind]
        print(f"{kind}, per pair of blocks: median {100 * median:.1f}%, quartiles {100 * low:.1f}% .. "
              f"{100 * high:.1f}% ({result['pairs']} pairs of {BLOCK_STEPS}-step blocks, one run)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
