"""The checkpoint engine's slice of the training config, and the modes it chooses between."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.checkpoint.snapshot import FOLDER_ENV

if TYPE_CHECKING:
    from trainer.config import TrainConfig


class SaveMode(str, Enum):
    ASYNC = "async"  # periodic saves stage a copy, then write it in the background
    SYNC = "sync"  # every save blocks training until it is committed


class WriterKind(str, Enum):
    PROCESS = "process"  # a writer process per rank writes async saves (a thread where it cannot start)
    THREAD = "thread"  # the save thread writes them itself


@dataclass(frozen=True)
class CheckpointSettings:
    directory: Path
    every: int | None  # save every K steps; None: auto (Young/Daly, see interval.py)
    first_step: bool  # also save right after step 1, then read it back
    mode: SaveMode
    writer: WriterKind
    keep_last: int
    resume_from: str | None  # a step number or a checkpoint path; None: the newest committed
    no_resume: bool
    expected_mtbf: float = 3600.0  # auto's prior: seconds between failures before any are seen
    snapshot_every: int | None = 0  # memory snapshots every K steps; 0: off; None: auto (interval.py)
    snapshot_folder: Path | None = None  # this run's snapshot folder, from the agent; None: no memory tier

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> CheckpointSettings:
        every = None if cfg.checkpoint_every == "auto" else int(cfg.checkpoint_every)
        snapshot_every = None if cfg.snapshot_every == "auto" else int(cfg.snapshot_every)
        return cls(Path(cfg.checkpoint_dir), every, cfg.checkpoint_first_step,
                   SaveMode(cfg.checkpoint_mode), WriterKind(cfg.checkpoint_writer), cfg.keep_last,
                   cfg.resume_from, cfg.no_resume, cfg.expected_mtbf, snapshot_every,
                   Path(folder) if (folder := os.environ.get(FOLDER_ENV)) else None)


@dataclass(frozen=True)
class RunIdentity:
    """What every commit marker of this run records about it."""

    run_id: str
    shape: dict[str, Any]  # the model-shape settings a resume must match
    config: dict[str, Any]  # the whole training config, for ``infer`` and the record
    dataset: dict[str, Any] | None = None  # the token dataset's fingerprint; None: synthetic data

    @classmethod
    def from_config(cls, cfg: TrainConfig, run_id: str, dataset: dict[str, Any] | None = None) -> RunIdentity:
        return cls(run_id, cfg.shape_fields(), cfg.to_dict(), dataset)
