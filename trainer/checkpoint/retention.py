"""Retention: which checkpoints stay once a newer one has committed."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint.layout import delete_step_dir, list_checkpoints


def apply_retention(root: Path, keep_last: int, resumed_step: int | None) -> list[Path]:
    """Keep the newest ``keep_last`` committed checkpoints and the one this run resumed from; delete
    the other committed ones and every partial one older than the newest commit. Returns what went."""
    checkpoints = list_checkpoints(root)
    committed = [info for info in checkpoints if info.committed]
    if not committed:
        return []
    newest = committed[-1].step
    keep = {info.step for info in committed[-keep_last:]} | {newest}
    if resumed_step is not None:
        keep.add(resumed_step)
    doomed = [info.path for info in checkpoints
              if (info.committed and info.step not in keep) or (not info.committed and info.step < newest)]
    for path in doomed:
        delete_step_dir(path)
    return doomed
