"""Goodput under failures: how much of the wall time goes to steps that count, per checkpoint interval.

``python -m bench.goodput [--minutes 2] [--kill-every 60] [--checkpoint-every auto]
[--intervals 10,25,50] [--seed 0] [--json FILE]`` runs ``fsdp-train local`` (2 workers, in-place
restarts, configs/local.yaml) for ``--minutes`` per interval and SIGKILLs a random worker at
random times averaging ``--kill-every`` seconds (uniform in [0.5, 1.5] x, seeded; the same
schedule for every interval). The job is told that rate as ``--expected-mtbf``, as an operator who
knows their cluster's failure rate would; only ``auto`` uses it, until the first failure.

goodput = (steps kept x clean step time) / wall time, with the wall time from the first step of
the run to its end, the steps kept those the run ended ahead of where it began, and the clean
step time the median time between consecutive steps of the same run (restarts and saves are
rare among them). Taking it from each run itself keeps the machine's drift between runs (10-15 %
here) out of the comparison. Also reported:
steps lost per failure and each recovery (the last kill before a start to the end of its first step;
a kill during a restart merges into that recovery). The table
covers ``--intervals`` and ``--checkpoint-every``, once per ``--modes`` (default ``cold,warm``: as
before the memory tier, with fresh interpreters and disk restores, and as now); the top-level
figures are those of ``--checkpoint-every`` in the last mode.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.jobs import MODES, LocalJob, last_step, records, wait_for

ROOT = Path(__file__).resolve().parent.parent


def flags(every: str, mode: str, args: argparse.Namespace) -> list[str]:
    return ["--nproc", "2", "--config", str(ROOT / "configs" / "local.yaml"), "--max-steps", str(10**6),
            "--no-progress", "--max-restarts", "1000", "--checkpoint-every", every, "--keep-last", "2",
            "--log-every", "1", "--no-checkpoint-first-step", "--expected-mtbf", str(args.kill_every),
            *MODES[mode][0], *args.extra]


def clean_step_seconds(steps: list[dict[str, Any]]) -> float:
    """Median time between consecutive steps of one run segment."""
    gaps = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(gaps)


def kill_schedule(args: argparse.Namespace) -> list[tuple[float, int]]:
    """(seconds after the first step, rank) of every kill: the same for every interval."""
    rng, at, kills = random.Random(args.seed), 0.0, []
    while True:
        at += rng.uniform(0.5, 1.5) * args.kill_every
        if at >= args.minutes * 60:
            return kills
        kills.append((at, rng.randrange(2)))


def failure_starts(work: Path) -> list[dict[str, Any]]:
    return [start for start in records(work, "start") if start.get("recovered_from", {}).get("cause") == "failure"]


def run_one(work: Path, every: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    job = LocalJob(work, work.with_suffix(".log"), *flags(every, mode, args), env=MODES[mode][1])
    kills: list[float] = []
    try:
        wait_for(lambda: last_step(work) >= 1, 300, "the first step")
        first = records(work, "step")[0]
        begin, begin_step = first["time"], first["step"]
        for offset, rank in kill_schedule(args):
            time.sleep(max(0.0, begin + offset - time.time()))
            pid = job.workers().get(rank)
            if pid is None:  # still restarting from the previous kill: it counts when it lands
                pid = wait_for(lambda r=rank: job.workers().get(r), 120, f"worker {rank}")
            kills.append(time.time())
            LocalJob.kill_pid(pid)
        time.sleep(max(0.0, begin + args.minutes * 60 - time.time()))
        end, end_step = time.time(), last_step(work)
        # A kill near the end may still be recovering: its start record is needed for the tallies
        # (recovery time, tier), not for the goodput, which the window above has already fixed.
        wait_for(lambda: any(start["time"] > kills[-1] for start in failure_starts(work)) if kills else True, 120,
                 "the recovery from the last kill")
    finally:
        job.stop()
    starts = failure_starts(work)
    # A kill while the group is still restarting from the one before merges the two into one
    # recovery: each start is timed from the last kill before it.
    recovery = [start["time"] - max(kill for kill in kills if kill < start["time"]) for start in starts
                if any(kill < start["time"] for kill in kills)]
    lost = [start["recovered_from"].get("steps_lost", 0) for start in starts]
    wall, clean_s = end - begin, clean_step_seconds(records(work, "step"))
    tiers = [start.get("restored_from") for start in starts]
    return {"every": every, "mode": mode, "goodput": (end_step - begin_step) * clean_s / wall, "failures": len(kills),
            "restored_from": {tier: tiers.count(tier) for tier in sorted(set(tiers), key=str)},
            "clean_step_s": clean_s,
            "steps_lost_per_failure": statistics.mean(lost) if lost else 0.0, "recovery_s": recovery,
            "steps_kept": end_step - begin_step, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="wall time per interval (default 2)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="mean seconds between kills (default 60)")
    parser.add_argument("--checkpoint-every", default="auto", help="K or auto: the headline interval (default auto)")
    parser.add_argument("--intervals", default="10,25,50", help="fixed intervals for the table (default 10,25,50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (default 0)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: cold (as before: fresh "
                        "interpreters, disk restores), warm (now); default both")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("extra", nargs="*", help="more flags for the job (after --)")
    args = parser.parse_args(argv)
    table = [every for every in args.intervals.split(",") if every]
    if args.checkpoint_every not in table:
        table.append(args.checkpoint_every)
    with tempfile.TemporaryDirectory(prefix="bench-goodput-") as tmp:
        print(f"{len(kill_schedule(args))} kills in {args.minutes:g} min per interval (mean every "
              f"{args.kill_every:g}s, seed {args.seed})", flush=True)
        rows = []
        for mode in args.modes.split(","):
            for every in table:
                row = run_one(Path(tmp) / f"{mode}-every-{every}", every, mode, args)
                rows.append(row)
                recovery = statistics.median(row["recovery_s"]) if row["recovery_s"] else float("nan")
                tiers = ", ".join(f"{tier} x{count}" for tier, count in row["restored_from"].items())
                print(f"  {mode} every {every:>5}: goodput {row['goodput']:6.1%}  failures {row['failures']}  steps "
                      f"lost per failure {row['steps_lost_per_failure']:5.1f}  recovery median {recovery:4.1f}s  "
                      f"clean step {row['clean_step_s'] * 1000:.0f} ms  restored from {tiers or '-'}", flush=True)
            mode_rows = [row for row in rows if row["mode"] == mode]
            headline = next(row for row in mode_rows if row["every"] == args.checkpoint_every)
            fixed = [row for row in mode_rows if row["every"] != "auto"]
            if headline["every"] == "auto" and fixed:
                best = max(fixed, key=lambda row: row["goodput"])
                print(f"  {mode}: auto {headline['goodput']:.1%} vs best fixed (every {best['every']}) "
                      f"{best['goodput']:.1%}: {(headline['goodput'] - best['goodput']) * 100:+.1f} points")
    result = {"goodput": headline["goodput"], "steps_lost_per_failure": headline["steps_lost_per_failure"],
              "recovery_s": headline["recovery_s"], "failures": headline["failures"], "mode": headline["mode"],
              "intervals": [{"mode": row["mode"], "every": row["every"], "goodput": row["goodput"]} for row in rows],
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
