"""The memory tier's snapshots, in one process: the state as raw bytes + JSON and back, two slots of
which one is always complete, a kill in the middle of a copy, what a start agrees to restore, and
what is freed or reclaimed."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from trainer.checkpoint.memory_tier import Offer, agree
from trainer.checkpoint.snapshot import (
    SnapshotSlots,
    flatten,
    job_key,
    reclaim,
    release,
    snapshot_folder,
    unflatten,
)


def state(value: float, step: int) -> dict:
    """A state dict shaped like ``AppState.state_dict()``: tensors, tuples, floats, None, int keys."""
    return {
        "model": {"layers.0.w": torch.full((64, 8), value), "ids": torch.arange(10) + int(value)},
        "optim": {"state": {"layers.0.w": {"step": torch.tensor(float(step)), "exp_avg": torch.full((64, 8), -value)}},
                  "param_groups": [{"lr": 1e-3 * value, "betas": (0.9, 0.95), "params": ["layers.0.w"],
                                    "foreach": None, "weight_decay": float("inf")}]},
        "trainer": {"step": step, "samples_seen": 32 * step, "seed": 0,
                    "scheduler": {"base_lrs": [0.005], "last_epoch": step, "lr_lambdas": [None], 3: "int key"}},
    }


def zeros_like(value):
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {key: zeros_like(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(zeros_like(item) for item in value)
    return value


def assert_same(restored, original) -> None:
    if isinstance(original, torch.Tensor):
        assert torch.equal(restored, original)
    elif isinstance(original, dict):
        assert restored.keys() == original.keys()
        for key in original:
            assert_same(restored[key], original[key])
    elif type(original) in (list, tuple):
        assert type(restored) is type(original) and len(restored) == len(original)
        for a, b in zip(restored, original):
            assert_same(a, b)
    else:
        assert restored == original and type(restored) is type(original)


def take(slots: SnapshotSlots, step: int, value: float | None = None, **overrides) -> None:
    kwargs = {"step": step, "world_size": 2, "run_id": "run-a", "config_digest": "cfg", **overrides}
    slots.take(state(value if value is not None else float(step), step), **kwargs)


def newest(slots: SnapshotSlots):
    complete = slots.complete()
    slot = max(complete, key=lambda k: complete[k].step)
    return slot, complete[slot]


def test_a_state_round_trips_through_json_and_bytes_with_its_types():
    original = state(2.5, 7)
    encoded, tensors = flatten(original)
    assert_same(unflatten(json.loads(json.dumps(encoded)), tensors), original)


def test_a_restore_fills_the_live_tensors_in_place_and_returns_the_values(tmp_path: Path):
    slots = SnapshotSlots(tmp_path, rank=1)
    take(slots, 5)
    live = zeros_like(state(0.0, 0))
    weights = live["model"]["layers.0.w"]
    slot, manifest = newest(slots)
    restored = slots.restore(slot, manifest, live)
    assert_same(restored, state(5.0, 5))
    assert restored["model"]["layers.0.w"] is weights, "the live tensor itself, filled in place"


def test_snapshots_alternate_slots_so_one_complete_snapshot_is_always_kept(tmp_path: Path):
    slots = SnapshotSlots(tmp_path, rank=0)
    for step in (1, 2, 3):
        take(slots, step)
    assert sorted(manifest.step for manifest in slots.complete().values()) == [2, 3]
    assert newest(slots)[1].step == 3


def test_segments_are_private_and_hold_no_pickle(tmp_path: Path):
    slots = SnapshotSlots(tmp_path, rank=0)
    take(slots, 1)
    assert stat.S_IMODE(os.stat(slots.folder).st_mode) == 0o700
    for path in slots.folder.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    manifest = json.loads(slots.manifest_path(0).read_text())  # plain JSON; the bytes file is raw tensor data
    assert manifest["layout"][0] == ["float32", [64, 8]]


@pytest.mark.parametrize("tamper", ["not json", '{"format": 1}', "dtype", "offsets", "short bytes"])
def test_a_damaged_manifest_or_bytes_file_is_never_restored(tmp_path: Path, tamper: str):
    slots = SnapshotSlots(tmp_path, rank=0)
    take(slots, 1)
    path = slots.manifest_path(0)
    if tamper == "short bytes":
        os.truncate(slots.data_path(0), 100)
    elif tamper in ("dtype", "offsets"):
        manifest = json.loads(path.read_text())
        if tamper == "dtype":
            manifest["layout"][0][0] = "object"
        else:
            manifest["offsets"][1] += 8
        path.write_text(json.dumps(manifest))
    else:
        path.write_text(tamper)
    assert slots.complete() == {}


SLOW_COPY = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
import trainer.checkpoint.snapshot as snapshot
import trainer.checkpoint.torch_compat as torch_compat
from test_snapshot import take
slots = snapshot.SnapshotSlots(Path({folder!r}), rank=0)
take(slots, 1)
take(slots, 2)
def slow_copy(targets, sources):
    for target, source in zip(targets, sources):
        target.copy_(source)
        print("copying", flush=True)
        time.sleep(60)
torch_compat.copy_all = slow_copy
take(slots, 3, value=99.0)  # into the slot of step 1
"""


def test_a_kill_during_the_copy_leaves_the_previous_snapshot_complete_and_intact(tmp_path: Path):
    code = SLOW_COPY.format(tests=str(ROOT / "tests"), folder=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "copying", "the third snapshot's copy has begun"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    slots = SnapshotSlots(tmp_path, rank=0)
    complete = slots.complete()
    assert [manifest.step for manifest in complete.values()] == [2], "the torn slot is not complete"
    slot, manifest = newest(slots)
    assert_same(slots.restore(slot, manifest, zeros_like(state(0.0, 0))), state(2.0, 2))


def offer(*steps: int, problem: str | None = None) -> Offer:
    return Offer(tuple(steps), problem)


@pytest.mark.parametrize(("offers", "disk", "expected"), [
    ([offer(4, 5), offer(4, 5)], 3, (5, None)),
    ([offer(4, 5), offer(3, 4)], None, (4, None)),  # a rank killed mid-snapshot: the newest step all hold
    ([offer(5), offer(5)], 5, (5, None)),
    ([offer(5), offer(problem="holds no snapshot")], 5, (None, "rank 1 holds no snapshot")),
    ([offer(4, 5), offer(6, 7)], None,
     (None, "the ranks hold snapshots of different steps (rank 0: 4/5, rank 1: 6/7)")),
    ([offer(problem="holds a snapshot written at world size 3, not 2"), offer(5)], None,
     (None, "rank 0 holds a snapshot written at world size 3, not 2")),
    ([offer(4, 5), offer(4, 5)], 6,
     (None, "the snapshots (step 5) are older than the newest checkpoint (step 6)")),
])
def test_a_start_restores_from_memory_only_when_every_rank_can(offers, disk, expected):
    assert agree(offers, disk) == expected


def test_what_a_job_left_is_reclaimed_by_its_next_run_and_freed_at_the_end(tmp_path: Path):
    old = snapshot_folder(tmp_path / "ckpt", "run-old", root=str(tmp_path / "shm"))
    other_job = snapshot_folder(tmp_path / "elsewhere", "run-x", root=str(tmp_path / "shm"))
    for folder in (old, other_job):
        take(SnapshotSlots(folder, 0), 1)
    new = snapshot_folder(tmp_path / "ckpt", "run-new", root=str(tmp_path / "shm"))
    assert new.parent == old.parent and new.parent.name == job_key(tmp_path / "ckpt")
    assert reclaim(new) == ["run-old"]
    assert not old.exists() and other_job.exists(), "another job's snapshots are not touched"
    take(SnapshotSlots(new, 0), 1)
    release(new)
    assert not new.parent.exists() and other_job.exists()

