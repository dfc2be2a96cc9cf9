"""Where the seconds of a recovery go, per failure kind, at `make train` size on this machine.

``python -m bench.recovery [--repeats 5] [--json FILE]`` runs ``fsdp-train local`` (2 workers,
configs/local.yaml), per mode one job for the in-place scenarios in turn and one for the SIGTERMs,
and injects each event ``--repeats`` times:

1. ``kill-one``: SIGKILL of one worker (torchrun restarts the group in place);
2. ``kill-all``: SIGKILL of every worker (the agent lives);
3. ``stop-one``: SIGSTOP of one worker, a hang (``--collective-timeout`` bounds it);
4. ``term-job``: SIGTERM to the job (emergency checkpoint, exit), then a fresh ``local`` start.

For each it prints the median and max of:
- detection: the event to the agent's first reaction in its log (it stops the group, or reports
  the failure); for ``term-job`` the signal itself is the notice (0);
- stop: from there to the spawn of the new workers (the old ones stopped, the new rendezvous);
  for ``term-job``, to the old job's exit (its emergency checkpoint included) and the new launch;
- restart: spawn to the end of the first step after it (the start record's phases);
- total: the event to the end of that first step;
- steps lost: completed steps that were redone.
Then the median of each start-up phase, so what to cut next is read off, not guessed, and which
tier each restart restored from. ``--modes cold,warm`` (the default) runs every scenario both ways
in one run: ``cold`` as before the memory tier (a fresh interpreter per worker, a restore from
disk), ``warm`` as now (workers forked from the agent's forkserver, a restore from memory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.jobs import MODES, LocalJob, breakdown, first_reaction, last_step, records, wait_for
from trainer.tools.monitor import PHASE_NAMES

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("kill-one", "kill-all", "stop-one", "term-job")
STEPS_BETWEEN = 15  # steps trained between two events: past the restart's warm-up
FIGURES = ("detection_s", "stop_s", "restart_s", "total_s", "steps_lost")


def job_flags(args: argparse.Namespace, mode: str) -> list[str]:
    return ["--nproc", "2", "--config", str(ROOT / "configs" / "local.yaml"), "--max-steps", str(10**6),
            "--no-progress", "--log-every", "1", "--max-restarts", str(10 * args.repeats), "--collective-timeout",
            str(args.collective_timeout), *MODES[mode][0], *args.extra]


def wait_for_new_start(job: LocalJob, starts_before: int, timeout: float) -> dict[str, Any]:
    def newer():
        if job.proc.poll() is not None:
            raise RuntimeError(f"the job exited ({job.proc.returncode}); see {job.log}")
        starts = records(job.dir, "start")
        return starts[-1] if len(starts) > starts_before else None

    return wait_for(newer, timeout, "the first step after the event")


def in_place(job: LocalJob, scenario: str, args: argparse.Namespace) -> dict[str, float]:
    """One event the agent recovers from in place; returns its breakdown."""
    reached = last_step(job.dir)
    wait_for(lambda: last_step(job.dir) >= reached + STEPS_BETWEEN, 300, f"{STEPS_BETWEEN} steps")
    starts = len(records(job.dir, "start"))
    workers = wait_for(lambda: (w := job.workers()) and len(w) == 2 and w, 60, "two workers")
    targets = list(workers.values()) if scenario == "kill-all" else [workers[1]]
    sig = signal.SIGSTOP if scenario == "stop-one" else signal.SIGKILL
    event = time.time()
    for pid in targets:
        os.kill(pid, sig)
    start = wait_for_new_start(job, starts, timeout=args.collective_timeout + 180)
    return breakdown(event, start, first_reaction(job.log.read_text(errors="replace"), event))


def fresh_starts(job: LocalJob, args: argparse.Namespace, mode: str, jobs: list[LocalJob]) -> list[dict[str, Any]]:
    """SIGTERM to the running ``job``, then the same job started again, ``--repeats`` times (each new
    start is the next one stopped); ``jobs`` gets each job started, for the caller to stop."""
    samples = []
    for index in range(args.repeats):
        reached = last_step(job.dir)
        wait_for(lambda j=job, r=reached: last_step(j.dir) >= r + STEPS_BETWEEN, 300, "training to go on")
        starts = len(records(job.dir, "start"))
        event = time.time()
        code = job.stop()
        if code != 0:
            raise RuntimeError(f"SIGTERM: the job exited {code}; see {job.log}")
        relaunched = time.time()
        job = LocalJob(job.dir, job.log.with_name(f"{job.log.stem}-term-{index}.log"), *job_flags(args, mode),
                       env=MODES[mode][1])
        jobs.append(job)
        start = wait_for_new_start(job, starts, timeout=300)
        figures = breakdown(event, start, event)
        figures["stop_s"] = relaunched - event  # the emergency checkpoint and the exit
        figures["restart_s"] = start["time"] - relaunched  # a new `local`: its preflight, torchrun, the workers
        samples.append(figures)
    return samples


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Per mode, one job serves the in-place events in turn; another the SIGTERMs."""
    results: dict[str, Any] = {}
    in_place_scenarios = [scenario for scenario in SCENARIOS if scenario in args.scenarios and scenario != "term-job"]
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for mode in args.modes:
            work = Path(tmp) / mode
            jobs = [LocalJob(work, Path(tmp) / f"{mode}.log", *job_flags(args, mode), env=MODES[mode][1])]
            try:
                wait_for(lambda w=work: last_step(w) >= 5, 300, "training to start")
                for scenario in in_place_scenarios:
                    samples = [in_place(jobs[0], scenario, args) for _ in range(args.repeats)]
                    results.setdefault(scenario, {})[mode] = summarise(samples)
                    print_row(f"{scenario} {mode}", results[scenario][mode])
                if "term-job" in args.scenarios:  # a job of its own: none of the events above before it
                    jobs[0].stop()  # nor its steps, on the same cores
                    jobs.append(LocalJob(Path(tmp) / f"{mode}-term", Path(tmp) / f"{mode}-term.log",
                                         *job_flags(args, mode), env=MODES[mode][1]))
                    results.setdefault("term-job", {})[mode] = summarise(fresh_starts(jobs[-1], args, mode, jobs))
                    print_row(f"term-job {mode}", results["term-job"][mode])
            finally:
                for job in jobs:
                    job.stop()
    return {scenario: results[scenario] for scenario in SCENARIOS if scenario in results}


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"samples": samples}
    for figure in FIGURES:
        values = [sample[figure] for sample in samples]
        summary[figure] = {"median": statistics.median(values), "max": max(values)}
    summary["phases_median"] = {name: statistics.median(sample["phases"][name] for sample in samples)
                                for name in PHASE_NAMES if all(name in sample["phases"] for sample in samples)}
    tiers = [sample["restored_from"] for sample in samples]
    summary["restored_from"] = {tier: tiers.count(tier) for tier in sorted(set(tiers), key=str)}
    return summary


def print_row(scenario: str, summary: dict[str, Any]) -> None:
    cells = "  ".join(f"{name.removesuffix('_s'):>10} {summary[name]['median']:6.2f} / {summary[name]['max']:6.2f}"
                      for name in FIGURES)
    phases = ", ".join(f"{name} {value:.2f}" for name, value in summary["phases_median"].items())
    tiers = ", ".join(f"{tier} x{count}" for tier, count in summary["restored_from"].items())
    print(f"{scenario:14} (median / max, s)  {cells}\n{'':14} restored from: {tiers}; restart phases (median, s): "
          f"{phases}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="events per scenario (default 5)")
    parser.add_argument("--scenarios", type=lambda text: text.split(","), default=list(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--modes", type=lambda text: text.split(","), default=list(MODES),
                        help="comma-separated: cold (as before: fresh interpreters, disk), warm (now); default both")
    parser.add_argument("--collective-timeout", type=float, default=10.0,
                        help="the job's --collective-timeout: what bounds a hang (default 10)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("extra", nargs="*", help="more flags for the job (after --)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS) | set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown scenario(s) or mode(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(SCENARIOS)} and {', '.join(MODES)}")
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
