"""Pieces of the fast checkpoint path, in one process: the row-range reader and the cached state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.checkpoint.app_state import AppState, Progress
from trainer.checkpoint.range_reader import RangeReader
from trainer.checkpoint.storage import CommittingWriter


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


@pytest.mark.parametrize("writer", ["dcp", "fsdp_train"])
def test_range_reader_loads_every_tensor_exactly(tmp_path: Path, writer: str) -> None:
    state = _sample_state()
    if writer == "dcp":  # stock writer: zip CRCs present
        dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    else:  # this project's writer: zip CRCs skipped, own checksums
        dcp.save(state, storage_writer=CommittingWriter(tmp_path, {"step": 1}), no_dist=True)
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
    dcp.save(state, storage_writer=CommittingWriter(tmp_path, {"step": 1}), no_dist=True)
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
