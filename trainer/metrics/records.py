"""Metrics: one JSON line per logged step in ``metrics.jsonl``, plus a readable log line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("fsdp_train")


def read_metrics(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    """All records in ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(checkpoint_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Appends records on rank 0; other ranks hold a writer that does nothing."""

    def __init__(self, checkpoint_dir: str | Path, enabled: bool, tensorboard: bool = False) -> None:
        self.path = Path(checkpoint_dir) / METRICS_FILE
        self.enabled = enabled
        self._warned = False
        self._sinks = []
        if enabled and tensorboard:
            from trainer.metrics.tensorboard import TensorBoardSink

            self._sinks.append(TensorBoardSink(checkpoint_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        for sink in self._sinks:
            sink.write(record)
        try:
            with self.path.open("a") as out:
                out.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk must not stop training; checkpoints report their own errors
            if not self._warned:
                log.warning("cannot append to %s (%s); metrics are skipped until it works again",
                            self.path, exc.strerror)
                self._warned = True

    def step(self, step: int, loss: float, world_size: int, samples_per_s: float, lr: float, **extra: Any) -> None:
        self.write({"event": "step", "step": step, "loss": loss, "world_size": world_size,
                    "samples_per_s": round(samples_per_s, 2), "lr": lr, **extra})

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, **fields})

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
