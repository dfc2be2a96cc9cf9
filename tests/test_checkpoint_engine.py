"""Pieces of the fast checkpoint path, in one process: the row-range reader, the cached state dict,
the torch.save frame cache, the layout-caching planner and the low-priority background writer."""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import default_planner

from conftest import draft_marker
from trainer.checkpoint import integrity, storage
from trainer.checkpoint.app_state import AppState, Progress
from trainer.checkpoint.frames import TorchSaveFrames, framing_alignment
from trainer.checkpoint.layout import read_marker
from trainer.checkpoint.planner import LayoutCachingSavePlanner
from trainer.checkpoint.range_reader import RangeReader
from trainer.checkpoint.records import ItemRecords
from trainer.checkpoint.save_thread import BACKGROUND_NICE, lower_this_thread_priority, save_thread
from trainer.checkpoint.staging import ReusableHostStager
from trainer.checkpoint.storage import FastCommittingWriter, zip_checksums


def _sample_state() -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    return {
        "rows": torch.randn(7, 5, generator=generator),
        "narrowed": torch.randn(9, 3, generator=generator)[2:6],  # saved with its whole storage
        "transposed": torch.randn(4, 6, generator=generator).t(),  # not contiguous: stock path
        "scalar": torch.tensor(3.0),
        "half": torch.randn(8, 2, generator=generator).to(torch.bfloat16),
        "count": 11,  # a byte item
    }


def _zeros_like(state: dict[str, object]) -> dict[str, object]:
    return {key: torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0 for key, value in state.items()}


def _load_plain(path: Path, like: dict[str, object]) -> dict[str, object]:
    loaded = _zeros_like(like)
    dcp.load(loaded, checkpoint_id=path, no_dist=True)
    return loaded


@pytest.mark.parametrize("writer", ["dcp", "fsdp_train"])
def test_range_reader_loads_every_tensor_exactly(tmp_path: Path, writer: str) -> None:
    state = _sample_state()
    if writer == "dcp":  # stock writer: zip CRCs present
        dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    else:  # this project's writer: zip CRCs skipped, own checksums
        dcp.save(state, storage_writer=FastCommittingWriter(tmp_path, draft_marker(1)), no_dist=True)
    loaded = _zeros_like(state)
    reader = RangeReader(tmp_path)
    dcp.load(loaded, storage_reader=reader, no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value
    assert reader.whole_items == ["transposed"], "only the non-contiguous tensor needs the stock path"


def test_range_reader_never_loads_a_truncated_tensor_silently(tmp_path: Path) -> None:
    state = {"rows": torch.randn(64, 64)}
    dcp.save(state, storage_writer=FastCommittingWriter(tmp_path, draft_marker(1)), no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    with shard.open("r+b") as out:
        out.truncate(shard.stat().st_size // 2)
    with pytest.raises(BaseException, match="corrupted|truncated"):
        dcp.load(_zeros_like(state), storage_reader=RangeReader(tmp_path), no_dist=True)


def _app_state() -> AppState:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return AppState(model, optimizer, scheduler, Progress(), seed=0)


def test_cached_state_dict_follows_training() -> None:
    app = _app_state()
    first = app.state_dict()
    app.scheduler.step()  # changes the learning rate in the optimizer's param group
    app.model(torch.randn(2, 4)).sum().backward()
    app.optimizer.step()  # updates weights and moments in place
    second = app.state_dict()
    assert second["optim"]["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert torch.equal(second["model"]["weight"], app.model.weight)
    moment = app.optimizer.state[app.model.weight]["exp_avg"]
    assert second["optim"]["state"]["weight"]["exp_avg"] is moment
    assert first["optim"]["state"]["weight"]["exp_avg"] is moment, "the cache is reused while tensors stay put"


def test_cached_state_dict_is_rebuilt_when_a_tensor_is_replaced() -> None:
    app = _app_state()
    app.state_dict()
    replacement = torch.full_like(app.optimizer.state[app.model.weight]["exp_avg"], 7.0)
    app.optimizer.state[app.model.weight]["exp_avg"] = replacement
    assert app.state_dict()["optim"]["state"]["weight"]["exp_avg"] is replacement


class _NiceRecordingWriter(FastCommittingWriter):
    """Records the CPU priority of the thread that writes the shard files."""

    writer_nice: int | None = None

    def write_data(self, plan, planner):
        self.writer_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return super().write_data(plan, planner)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux-only")
def test_async_writes_run_at_the_lowest_priority_and_leave_the_caller_alone(tmp_path: Path) -> None:
    caller_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    background = _NiceRecordingWriter(tmp_path / "async", draft_marker(1))
    with save_thread() as writer_thread:
        writer_thread.submit(dcp.save, {"rows": torch.randn(8, 4)}, storage_writer=background,
                             no_dist=True).result()
    assert background.writer_nice == BACKGROUND_NICE
    lower_this_thread_priority()  # what the writer thread runs first; on the main thread it must do nothing
    blocking = _NiceRecordingWriter(tmp_path / "sync", draft_marker(2))
    dcp.save({"rows": torch.randn(8, 4)}, storage_writer=blocking, no_dist=True)
    assert blocking.writer_nice == caller_nice, "a save on the main thread must never lower training's priority"


def _torch_save_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _dcp_item_bytes(tensor: torch.Tensor) -> bytes:
    """What DCP's own writer writes for a tensor: ``torch.save`` of a clone when it is a view."""
    return _torch_save_bytes(tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor)


def _framed_bytes(frames: TorchSaveFrames, tensor: torch.Tensor) -> bytes:
    return b"".join(piece.tobytes() for piece in frames.pieces(tensor, framing_alignment())[0])


FRAME_CASES = {
    "matrix": (lambda: torch.randn(30, 7), True),
    "bf16": (lambda: torch.randn(5).to(torch.bfloat16), True),
    "scalar": (lambda: torch.tensor(3.0), True),
    "int64": (lambda: torch.arange(10), True),
    "bool": (lambda: torch.rand(6) > 0.5, True),
    "empty": (lambda: torch.zeros(0, 3), False),
    "transposed": (lambda: torch.randn(4, 6).t(), False),
    "narrowed": (lambda: torch.randn(9, 3)[2:6], True),  # a view: its own bytes, as DCP's clone
    "arena_slice": (lambda: torch.randn(40)[8:20].view(3, 4), True),
    "requires_grad": (lambda: torch.randn(3, requires_grad=True), False),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_frames_write_exactly_what_dcp_writes(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, reuses_frame = FRAME_CASES[case]
    frames = TorchSaveFrames()
    with zip_checksums(False):
        tensors = [make(), make()]  # same layout, other values
        expected = [_dcp_item_bytes(tensor) for tensor in tensors]
        for tensor, reference in zip(tensors, expected):
            written = _framed_bytes(frames, tensor)
            assert written == reference
            if reuses_frame:  # from now on torch.save must not run for this layout
                monkeypatch.setattr(torch, "save", lambda *args, **kwargs: pytest.fail("torch.save ran again"))
        if reuses_frame:  # the payload is the tensor's own memory, not a copy
            payload = torch.frombuffer(frames.pieces(tensors[1], framing_alignment())[0][1], dtype=torch.uint8)
            assert payload.data_ptr() == tensors[1].data_ptr() and payload.numel() == tensors[1].nbytes
    assert torch.equal(torch.load(io.BytesIO(written), weights_only=True), tensors[1].detach())


def test_frames_are_not_used_while_zip_crcs_are_on() -> None:
    frames = TorchSaveFrames()
    with zip_checksums(True):
        assert framing_alignment() is None
        for tensor in (torch.randn(8, 2), torch.randn(8, 2)):  # a CRC depends on the values
            assert _framed_bytes(frames, tensor) == _torch_save_bytes(tensor)


def test_writer_files_match_stock_dcp_byte_for_byte(tmp_path: Path) -> None:
    """Across saves sharing one frame cache, the shard file is what stock DCP (CRCs off) writes."""
    records = ItemRecords()
    for step in (1, 2):
        state = dict(_sample_state())
        state["rows"] = state["rows"] + step  # new values, same layout
        ours, stock = tmp_path / f"ours-{step}", tmp_path / f"stock-{step}"
        dcp.save(state, storage_writer=FastCommittingWriter(ours, draft_marker(step), records=records), no_dist=True)
        with zip_checksums(False):
            dcp.save(state, checkpoint_id=stock, no_dist=True)
        shards = sorted(path.name for path in stock.glob("*.distcp"))
        assert shards == sorted(path.name for path in ours.glob("*.distcp"))
        for name in shards:
            assert (ours / name).read_bytes() == (stock / name).read_bytes(), name
        loaded = _load_plain(ours, state)  # the stock reader
        assert torch.equal(loaded["rows"], state["rows"])


def test_planner_reuses_the_local_plan_until_the_layout_changes(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []
    build = default_planner.create_default_local_save_plan
    monkeypatch.setattr(default_planner, "create_default_local_save_plan",
                        lambda *args: builds.append(1) or build(*args))
    planner = LayoutCachingSavePlanner()

    def save(name: str, state: dict[str, object]) -> None:
        dcp.save(state, storage_writer=FastCommittingWriter(tmp_path / name, draft_marker(1)), planner=planner,
                 no_dist=True)

    for step in range(3):
        save(f"same-{step}", {"rows": torch.full((4, 3), float(step)), "count": step})
    assert len(builds) == 1, "an unchanged layout must not be planned again"
    grown = {"rows": torch.randn(5, 3), "count": 7}
    save("grown", grown)
    assert len(builds) == 2, "a changed shape must be planned afresh"
    for name, expected in (("same-2", {"rows": torch.full((4, 3), 2.0), "count": 2}), ("grown", grown)):
        loaded = _load_plain(tmp_path / name, expected)
        assert torch.equal(loaded["rows"], expected["rows"]) and loaded["count"] == expected["count"], name


def test_item_records_are_reused_only_while_their_values_stay_put(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves of one state dict reuse each item's record, yet always write the current values."""
    resolved: list[str] = []
    resolve = default_planner.DefaultSavePlanner.resolve_data
    monkeypatch.setattr(default_planner.DefaultSavePlanner, "resolve_data",
                        lambda self, item: resolved.append(item.index.fqn) or resolve(self, item))
    records, planner = ItemRecords(), LayoutCachingSavePlanner()
    state = {"rows": torch.randn(6, 4), "cols": torch.randn(3), "count": 1, "group": {"lr": 0.5, "ids": ["a"]}}

    def save(name: str) -> None:
        resolved.clear()
        dcp.save(state, storage_writer=FastCommittingWriter(tmp_path / name, draft_marker(1), records=records),
                 planner=planner, no_dist=True)
        loaded = _zeros_like(state) | {"group": {"lr": 0.0, "ids": []}}
        dcp.load(loaded, checkpoint_id=tmp_path / name, no_dist=True)
        for key in ("rows", "cols"):
            assert torch.equal(loaded[key], state[key]), f"{name}: {key}"
        assert loaded["count"] == state["count"] and loaded["group"] == state["group"], name

    save("first")
    assert sorted(resolved) == ["cols", "count", "group.ids", "group.lr", "rows"]
    state["rows"].add_(1.0)  # new values in place: the record is reused and shows them
    save("in-place")
    assert resolved == [], "an unchanged item must not be resolved again"
    state["cols"] = torch.randn(3)  # another tensor object, same layout
    state["rows"].set_(torch.randn(6, 4))  # same object, same shape, other storage
    state["count"] = 2
    state["group"]["ids"].append("b")
    save("replaced")
    assert sorted(resolved) == ["cols", "count", "group.ids", "rows"], "changed items must be resolved afresh"


def test_writer_finishes_files_through_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``writev`` may write less than asked (a signal, a quota): the rest must still reach the file."""
    calls: list[int] = []
    real_writev = os.writev

    def short_writev(descriptor: int, views: list[memoryview]) -> int:
        calls.append(len(views))
        first = memoryview(views[0]).cast("B")
        return real_writev(descriptor, [first[:max(1, len(first) // 3)]])  # a third of one buffer

    monkeypatch.setattr(os, "writev", short_writev)
    state = {"rows": torch.randn(50, 40), "scalar": torch.tensor(2.0), "count": 3}
    dcp.save(state, storage_writer=FastCommittingWriter(tmp_path, draft_marker(1)), no_dist=True)
    monkeypatch.setattr(os, "writev", real_writev)
    assert len(calls) > 10, "the short writes were not exercised"
    loaded = _load_plain(tmp_path, state)
    assert torch.equal(loaded["rows"], state["rows"]) and torch.equal(loaded["scalar"], state["scalar"])
    assert loaded["count"] == 3
    assert integrity.problems(tmp_path, read_marker(tmp_path).files) == []


def test_stager_snapshots_values_and_follows_a_changed_layout() -> None:
    live = {"weights": torch.randn(4, 3, requires_grad=True), "moments": [torch.zeros(5), torch.ones(2)],
            "group": {"lr": 0.1, "betas": (0.9, 0.99), "params": ["weights"]}, "step": 7}
    stager = ReusableHostStager()
    stager.prepare(live)
    staged = stager.stage(live)
    buffers = [staged["weights"], *staged["moments"]]
    with torch.no_grad():
        expected = [tensor.clone() for tensor in (live["weights"], *live["moments"])]
        live["weights"].add_(1.0)  # training goes on: the snapshot must not move
        live["moments"][0].fill_(3.0)
    live["group"]["lr"] = 0.05
    live["group"]["params"].append("extra")
    assert all(torch.equal(got, want) for got, want in zip(buffers, expected))
    assert not staged["weights"].requires_grad, "a staged copy must not join the autograd graph"
    assert staged["group"] == {"lr": 0.1, "betas": (0.9, 0.99), "params": ["weights"]} and staged["step"] == 7
    again = stager.stage(live)
    assert again["weights"] is buffers[0], "an unchanged layout must reuse its buffers"
    assert torch.equal(again["weights"], live["weights"].detach()) and again["group"]["lr"] == 0.05
    live["moments"].append(torch.full((3,), 2.0))  # the layout changed: new buffers, right values
    grown = stager.stage(live)
    assert torch.equal(grown["moments"][2], torch.full((3,), 2.0))
    assert torch.equal(grown["moments"][0], live["moments"][0])


def test_writer_hands_every_byte_to_the_disk_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Writeback starts batch by batch, not only at the final fsync; the file is unchanged by it.
    requested: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def record(descriptor: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            requested.append((offset, length))
        real_fadvise(descriptor, offset, length, advice)

    monkeypatch.setattr(storage, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(os, "posix_fadvise", record)
    state = {"rows": torch.randn(300, 40), "scalar": torch.tensor(2.0), "count": 3}
    dcp.save(state, storage_writer=FastCommittingWriter(tmp_path, draft_marker(1)), no_dist=True)
    shard_bytes = sum(path.stat().st_size for path in tmp_path.glob("*.distcp"))
    assert shard_bytes > 10 * 4096
    assert all(length <= 4096 for _, length in requested)
    assert sum(length for _, length in requested) == shard_bytes, "every shard byte is handed to writeback"
    assert [offset for offset, _ in requested if offset == 0] == [0], "one file, written front to back"
    assert all(offset + length == following for (offset, length), (following, _) in zip(requested, requested[1:]))
    loaded = _load_plain(tmp_path, state)
    assert torch.equal(loaded["rows"], state["rows"]) and loaded["count"] == 3
