"""Training overhead of checkpointing: steps/s with a checkpoint every 10 steps vs none, same run.

``python -m bench.overhead [--steps 200] [--json FILE]`` trains the ``make train`` model on 2 CPU
ranks, alternating runs without checkpoints and with async checkpoints every 10 steps, and
compares their best steady-state step rates (the first 20 steps are warm-up and not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20


def steps_per_second(directory: Path) -> float:
    steps = [r for r in read_metrics(directory) if r.get("event") == "step" and r["step"] >= WARMUP]
    return (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["time"] - steps[0]["time"])


def train(directory: Path, steps: int, every: int) -> float:
    command = [sys.executable, "-m", "trainer", "local", "--nproc", "2", "--config", str(ROOT / "configs" / "local.yaml"),
               "--no-progress", "--log-every", "1", "--max-steps", str(steps), "--checkpoint-every", str(every),
               "--no-checkpoint-first-step", "--checkpoint-dir", str(directory)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return steps_per_second(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs; the best of each kind is kept")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"none": [], "every_10": []}
    with tempfile.TemporaryDirectory(prefix="fsdp-train-overhead-", dir=ROOT) as work:
        for round_index in range(args.rounds):
            for name, every in (("none", 10**9), ("every_10", 10)):
                rates[name].append(train(Path(work) / f"{name}-{round_index}", args.steps, every))
    best = {name: max(values) for name, values in rates.items()}
    slowdown = 1 - best["every_10"] / best["none"]
    print(f"steps/s without checkpoints: {best['none']:.2f}; with a checkpoint every 10 steps: "
          f"{best['every_10']:.2f}; slowdown {100 * slowdown:.1f}% (target <= 2%)")
    print(f"all runs: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in rates.items()})}")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps_per_s": best, "runs": rates, "slowdown": slowdown}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
