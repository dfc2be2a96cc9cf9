"""``--tensorboard``: the records of ``metrics.jsonl`` also as TensorBoard event files.

Scalars: training loss, held-out loss, learning rate, gradient norm, samples/s and world size,
by global step; each resume is a text event at its step (``resumes``), so a curve's jumps can be
read against what caused them. Files go to ``<checkpoint-dir>/tensorboard`` (one event file per
run segment; TensorBoard merges them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "samples_per_s": "perf/samples_per_s", "world_size": "job/world_size"}


class TensorBoardSink:
    def __init__(self, checkpoint_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(checkpoint_dir) / TENSORBOARD_DIR), flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        event, step = record.get("event"), record.get("step", 0)
        if event == "step":
            for key, tag in STEP_SCALARS.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], step, walltime=record["time"])
        elif event == "eval":
            self.writer.add_scalar("eval/loss", record["loss"], step, walltime=record["time"])
        elif event == "start" and record.get("resumed_from"):
            source = record["resumed_from"]
            cause = (record.get("recovered_from") or {}).get("cause", "resume")
            changes = "; ".join(record.get("setting_changes") or [])
            text = f"resumed at step {source['step']} ({cause}): world {source['world_size']} -> {record['world_size']}"
            self.writer.add_text("resumes", text + (f"; {changes}" if changes else ""), step, walltime=record["time"])
        elif event in ("end", "preempted"):
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
