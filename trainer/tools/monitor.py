"""``status``, ``watch`` and ``plot``: a run's progress read from ``metrics.jsonl`` and commit markers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.checkpoint.layout import committed_checkpoints
from trainer.errors import UserError
from trainer.metrics.records import METRICS_FILE, read_metrics


@dataclass
class RunSummary:
    steps: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    max_steps: int | None = None

    @property
    def resumes(self) -> list[dict[str, Any]]:
        return [start for start in self.starts if start.get("resumed_from")]


def summarize(directory: str | Path) -> RunSummary:
    summary = RunSummary()
    for record in read_metrics(directory):
        event = record.get("event")
        if event == "step":
            summary.steps.append(record)
        elif event == "start":
            summary.starts.append(record)
            summary.max_steps = record.get("max_steps", summary.max_steps)
            summary.ended = False
        elif event == "eval":
            summary.evals.append(record)
        elif event == "end":
            summary.ended = True
    return summary


PHASE_NAMES = {"process_start": "process", "init_process_group": "init", "lock": "lock", "build_model": "model",
               "shard": "shard", "restore": "restore", "writer_start": "writers", "first_step": "first step"}


def describe_phases(phases: dict[str, Any]) -> str:
    """A start record's phases on one line: ``process 1.6s, init 0.0s, ..., restore 0.1s (choose 0.06s, ...)``."""
    parts = []
    for key, label in PHASE_NAMES.items():
        seconds = phases.get(key)
        if seconds is None:
            continue
        text = f"{label} {seconds:.2f}s"
        if key == "restore" and phases.get("restore_parts"):
            text += " (" + ", ".join(f"{name} {value:.2f}s" for name, value in phases["restore_parts"].items()) + ")"
        parts.append(text)
    known = [phases[key] for key in PHASE_NAMES if isinstance(phases.get(key), (int, float))]
    return ", ".join(parts) + f"; {sum(known):.2f}s in all"


def _require_metrics(directory: str) -> None:
    if not (Path(directory) / METRICS_FILE).exists():
        raise UserError(f"{directory}: no {METRICS_FILE}; pass the --checkpoint-dir of a run")


# How ``status`` says what a start followed (the start record's ``recovered_from.cause``)
START_CAUSES = {"failure": " after a failure", "preempted": " after a stop (its emergency checkpoint)",
                "scale": " at a new world size, after a stop", "continued": " continuing a run that had ended"}


def status(directory: str, namespace: str | None = None, release: str | None = None) -> str:
    _require_metrics(directory)
    run = summarize(directory)
    last = run.steps[-1] if run.steps else {}
    committed = committed_checkpoints(directory)
    lines = [f"run in {directory}: {'finished' if run.ended else 'in progress or stopped'}",
             f"  step {last.get('step', 0)}/{run.max_steps}, loss {last.get('loss', float('nan')):.5f}, "
             f"world size {last.get('world_size', '-')}, {last.get('samples_per_s', 0):.0f} samples/s"
             + (f", epoch {last['epoch']}, {last['tokens_seen']:,} tokens" if "epoch" in last else "")]
    if run.evals:
        lines.append(f"  held-out loss {run.evals[-1]['loss']:.5f} at step {run.evals[-1]['step']}")
    if committed:
        newest = committed[-1].marker
        lines.append(f"  last checkpoint: step {newest.step} ({newest.reason.value}, world size "
                     f"{newest.world_size}), {time.time() - newest.created:.0f}s ago")
    else:
        lines.append("  last checkpoint: none committed yet")
    if run.starts and run.starts[-1].get("phases"):
        last_start = run.starts[-1]
        recovered = last_start.get("recovered_from") or {}
        after = START_CAUSES.get(recovered.get("cause"), "")
        tier = f", restored from {last_start['restored_from']}" if last_start.get("restored_from") else ""
        lost = f", {recovered['steps_lost']} step(s) lost" if "steps_lost" in recovered else ""
        lines.append(f"  last start{after}{tier}{lost} took: {describe_phases(last_start['phases'])}")
    lines.append(f"  resumes so far: {len(run.resumes)}" + "".join(
        f"\n    at step {r['resumed_from']['step']}: world {r['resumed_from']['world_size']} -> {r['world_size']}"
        + (f" (from {r['restored_from']})" if r.get("restored_from") else "") for r in run.resumes))
    if release:
        lines += _pod_lines(namespace or "default", release)
    return "\n".join(lines)


def _pod_lines(namespace: str, release: str) -> list[str]:
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 - many ways for a kubeconfig to be missing
        try:
            config.load_incluster_config()
        except Exception:  # noqa: BLE001
            raise UserError("--release: no Kubernetes config found (kubeconfig or in-cluster); "
                            "set KUBECONFIG or drop --release") from None
    pods = client.CoreV1Api().list_namespaced_pod(
        namespace, label_selector=f"app.kubernetes.io/instance={release}").items
    lines = [f"  pods of release {release} in {namespace}: {len(pods)}"]
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        restarts = sum(s.restart_count for s in (pod.status.container_statuses or []))
        lines.append(f"    {pod.metadata.name:48} {pod.status.phase:10} restarts {restarts}")
    return lines


def watch(directory: str, poll: float = 1.0, timeout: float | None = None) -> int:
    """Follow ``metrics.jsonl`` with a progress bar until the run ends (or ``timeout`` seconds pass)."""
    from tqdm import tqdm

    _require_metrics(directory)
    started = time.monotonic()
    run = summarize(directory)
    bar = tqdm(total=run.max_steps, unit="step", dynamic_ncols=True)
    try:
        while True:
            run = summarize(directory)
            bar.total = run.max_steps
            if run.steps:
                last = run.steps[-1]
                bar.update(last["step"] - bar.n)
                evaluated = {"eval": f"{run.evals[-1]['loss']:.4f}"} if run.evals else {}
                bar.set_postfix(loss=f"{last['loss']:.4f}", **evaluated, world=last["world_size"],
                                samples_s=f"{last['samples_per_s']:.0f}")
            if run.ended:
                return 0
            if timeout is not None and time.monotonic() - started > timeout:
                return 1
            time.sleep(poll)
    finally:
        bar.close()


def resume_labels(resumes: list[dict], span_steps: int, axis_px: float,
                  label_px: float = 12.0) -> list[tuple[int, str]]:
    """(step, text) of the resume labels: resumes closer together than a label's width on the axis
    share one label at the first of them, so no two labels overlap."""
    min_gap = span_steps * label_px / axis_px
    groups: list[list[dict]] = []
    for resume in sorted(resumes, key=lambda r: r["resumed_from"]["step"]):
        if groups and resume["resumed_from"]["step"] - groups[-1][-1]["resumed_from"]["step"] < min_gap:
            groups[-1].append(resume)
        else:
            groups.append([resume])

    def world(resume: dict) -> str:
        return f"{resume['resumed_from']['world_size']}\u2192{resume['world_size']}"

    labels = []
    for group in groups:
        first = group[0]["resumed_from"]["step"]
        if len(group) == 1:
            labels.append((first, f"resume: world {world(group[0])}"))
        else:
            labels.append((first, f"{len(group)} resumes (steps {first}-{group[-1]['resumed_from']['step']}): world "
                                  + ", ".join(world(r) for r in group)))
    return labels


def plot(directory: str, output: str, width: float = 10.0, height: float = 5.0, dpi: int = 100) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _require_metrics(directory)
    run = summarize(directory)
    if not run.steps:
        raise UserError(f"{directory}: no step records yet; plot again once training has logged steps")
    figure, axes = plt.subplots(figsize=(width, height), dpi=dpi)
    axes.plot([s["step"] for s in run.steps], [s["loss"] for s in run.steps], color="tab:blue", lw=1.2,
              label="loss")
    if run.evals:
        axes.plot([e["step"] for e in run.evals], [e["loss"] for e in run.evals], color="tab:orange", lw=1.5,
                  marker="o", ms=3, label="held-out loss")
    loss_at = {s["step"]: s["loss"] for s in run.steps}
    points = [(c.step, loss_at[c.step]) for c in committed_checkpoints(directory) if c.step in loss_at]
    if points:
        axes.scatter(*zip(*points), color="tab:green", zorder=3, s=24, label="committed checkpoint")
    top = max([*loss_at.values(), *(e["loss"] for e in run.evals)])
    steps = [s["step"] for s in run.steps]
    for resume in run.resumes:
        axes.axvline(resume["resumed_from"]["step"], color="tab:red", ls="--", lw=1)
    # an axis of width x dpi pixels, most of it plot area; a rotated 8-point label is about 12 px wide
    for step, text in resume_labels(run.resumes, max(steps) - min(steps) or 1, width * dpi * 0.75):
        axes.annotate(text, (step, top), rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"training loss ({Path(directory).resolve().name})")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: it never hides a label
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
