"""Per-step reporting on rank 0: metrics record, and a log line or a live progress bar."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.config import TrainConfig
from trainer.metrics.records import MetricsWriter

log = logging.getLogger("fsdp_train")


class StepReporter:
    def __init__(self, cfg: TrainConfig, enabled: bool, first_step: int) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self._last_time = time.perf_counter()
        self._last_step = first_step
        self._bar = None
        self._redirect = None
        if enabled and cfg.progress:
            self._bar = tqdm(total=cfg.max_steps, initial=first_step, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it
            self._redirect.__enter__()

    def step(self, step: int, loss: float, world_size: int, lr: float, metrics: MetricsWriter, **extra: Any) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)  # the bar moves every step; records follow --log-every
        if not self.enabled or (step % self.cfg.log_every and step != self.cfg.max_steps):
            return
        now = time.perf_counter()
        rate = (step - self._last_step) * self.cfg.global_batch_size / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        metrics.step(step, loss, world_size, rate, lr, **extra)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", world=world_size, samples_s=f"{rate:.0f}")
        else:
            log.info("step %d/%d | loss %.5f | world %d | %.0f samples/s | lr %.2e",
                     step, self.cfg.max_steps, loss, world_size, rate, lr)

    def evaluation(self, step: int, loss: float, metrics: MetricsWriter) -> None:
        metrics.event("eval", step=step, loss=loss)
        if self.enabled:
            log.info("step %d/%d | eval loss %.5f", step, self.cfg.max_steps, loss)

    def close(self) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
            self._bar = None
