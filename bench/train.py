"""Training speed: fsdp-train's step against a minimal hand-written FSDP2 loop, and the data loader
against what the step consumes.

``python -m bench.train [--blocks 6] [--block-steps 10] [--worlds 1,2] [--precisions fp32,bf16]
[--config FILE] [--json FILE]`` runs one torchrun job per world size and precision, at ``make train``
size (configs/local.yaml, or ``--config``'s) on a token dataset of the standard library's source
(prepared into a temporary folder). In each job the same ranks alternate (ABBA) blocks of
``fsdp-train``'s ``Trainer.train_step`` (prefetching loader, micro-batch loop, clipping, the stop all-reduce) and
of a plain loop: the same model, dtype policy, batch and AdamW, with ``fully_shard``, forward,
backward, step and nothing else. Ratio = our tokens/s / the plain loop's (target: at least 0.95).
Loader: tokens/s of ``TokenWindows.batch`` on one thread for a whole global batch, against the
tokens/s the fastest training configuration consumes (target: at least 50x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.jobs import job_settings

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 5
KINDS = ("fsdp_train", "plain")


def _config(config: str | None, work: Path, data: Path, precision: str, max_grad_norm: float):
    from trainer.config import TrainConfig

    settings = job_settings(config)
    settings.update(checkpoint_dir=str(work), data=str(data), max_steps=10**6, progress=False, log_every=10**6,
                    checkpoint_first_step=False, checkpoint_every=10**6, eval_every=0,
                    mixed_precision="bf16" if precision == "bf16" else "none", max_grad_norm=max_grad_norm)
    return TrainConfig(**settings)


class PlainLoop:
    """The least a training step can do with FSDP2: what the comparison is against."""

    def __init__(self, cfg: Any, device: Any) -> None:
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from trainer.data.loader import TrainingData, rank_slice
        from trainer.models.build import build_model

        self.cfg, self.device = cfg, device
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if cfg.mixed_precision == "bf16" else MixedPrecisionPolicy())
        self.model = build_model(cfg).to(device)
        for layer in self.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        import torch.distributed as dist

        start, stop = rank_slice(cfg.global_batch_size, dist.get_world_size(), dist.get_rank())
        self.inputs, self.targets = TrainingData(cfg).train.batch(start, stop - start)  # one batch, reused

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        logits = self.model(self.inputs.to(self.device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.targets.to(self.device).flatten())
        loss.backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from trainer.train import Trainer

    cfg = _config(args.config, Path(args.work), Path(args.data), args.precision, args.max_grad_norm)
    trainer = Trainer(cfg)
    trainer.setup()
    plain = PlainLoop(cfg, trainer.rt.device)
    steps = {"fsdp_train": trainer.train_step, "plain": plain.step}
    for run in steps.values():
        for _ in range(WARMUP_STEPS):
            run()

    def block(kind: str) -> float:
        dist.barrier()
        started = time.perf_counter()
        for _ in range(args.block_steps):
            steps[kind]()
        dist.barrier()
        return time.perf_counter() - started

    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for index in range(args.blocks):
        for kind in KINDS if index % 2 == 0 else reversed(KINDS):
            seconds[kind].append(block(kind))
    if trainer.rt.is_primary:
        Path(args.out).write_text(json.dumps(seconds))
    trainer.close()


def loader_tokens_per_s(config: str | None, data: Path, rounds: int = 5, batches: int = 20) -> float:
    """Best of ``rounds``: tokens/s of fetching whole global batches of shuffled windows."""
    from trainer.config import TrainConfig
    from trainer.data.loader import TrainingData

    settings = job_settings(config)
    cfg = TrainConfig(**{**settings, "data": str(data), "progress": False, "eval_every": 0})
    windows = TrainingData(cfg).train
    best = 0.0
    for round_ in range(rounds):
        started = time.perf_counter()
        for batch in range(batches):
            windows.batch((round_ * batches + batch) * cfg.global_batch_size, cfg.global_batch_size)
        best = max(best, batches * cfg.global_batch_size * cfg.seq_len / (time.perf_counter() - started))
    return best


def prepare_stdlib(out: Path) -> None:
    subprocess.run(["bash", str(ROOT / "hack" / "stdlib-data.sh"), str(Path(sys.executable).parent.parent), str(out)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="timed blocks per kind (default 6)")
    parser.add_argument("--block-steps", type=int, default=10, help="steps per block (default 10)")
    parser.add_argument("--worlds", default="1,2", help="world sizes (default 1,2)")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (default both)")
    parser.add_argument("--data", help="a prepared dataset (default: the stdlib's source, prepared now)")
    parser.add_argument("--config", metavar="FILE", help="the job's settings (default configs/local.yaml)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    for hidden in ("--work", "--out", "--precision"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--max-grad-norm", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.work:
        worker(args)
        return 0
    results: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="fsdp-train-bench-train-", dir=ROOT) as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            prepare_stdlib(data)
        grad_norm = job_settings(args.config).get("max_grad_norm", 0.0)
        for world in [int(w) for w in args.worlds.split(",")]:
            for precision in args.precisions.split(","):
                out = Path(tmp) / f"blocks-{world}-{precision}.json"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "-m", "bench.train", "--blocks", str(args.blocks), "--block-steps", str(args.block_steps),
                           "--work", str(Path(tmp) / f"ckpt-{world}-{precision}"), "--data", str(data),
                           "--precision", precision, "--max-grad-norm", str(grad_norm), "--out", str(out),
                           *(["--config", args.config] if args.config else [])]
                subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL)
                seconds = json.loads(out.read_text())
                cfg = _config(args.config, Path(tmp), data, precision, grad_norm)
                tokens = args.block_steps * cfg.global_batch_size * cfg.seq_len
                rates = {kind: tokens / min(values) for kind, values in seconds.items()}  # best block
                run = {"world_size": world, "precision": precision, "tokens_per_s": rates,
                       "ratio": rates["fsdp_train"] / rates["plain"], "block_seconds": seconds}
                results["runs"].append(run)
                print(f"world {world} {precision}: fsdp-train {rates['fsdp_train']:,.0f} tokens/s, plain FSDP2 loop "
                      f"{rates['plain']:,.0f} tokens/s: ratio {run['ratio']:.3f} (target >= 0.95)", flush=True)
        fastest = max(run["tokens_per_s"]["fsdp_train"] for run in results["runs"])
        loader = loader_tokens_per_s(args.config, data)
    results["loader"] = {"tokens_per_s": loader, "fastest_step_tokens_per_s": fastest, "ratio": loader / fastest}
    print(f"loader: {loader:,.0f} tokens/s on one thread, {loader / fastest:,.0f}x what the fastest step consumes "
          f"({fastest:,.0f} tokens/s; target >= 50x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
