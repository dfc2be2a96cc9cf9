"""The writer process: it saves what the trainer staged, from shared memory, and never outlives its trainer.

These tests drive one writer (a world of one) against a store this test process hosts;
the 2-rank training tests run every async save through writer processes as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from conftest import ROOT, draft_marker, wait_for
from trainer.checkpoint.failures import SaveFailed
from trainer.checkpoint.layout import COMMIT_FILE
from trainer.checkpoint.shared_arena import TensorRef, fill_slots
from trainer.checkpoint.staging import ReusableHostStager
from trainer.checkpoint.wire import Hello
from trainer.checkpoint.writer_client import WriterClient, WriterProcessDied, WriterUnavailable
from trainer.checkpoint.writer_server import WriterState

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="writer processes need memfd (Linux)")


@pytest.fixture(scope="module")
def store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture
def writer(store: dist.TCPStore, request: pytest.FixtureRequest):
    process = WriterClient(Hello(0, 1, "127.0.0.1", store.port, f"{request.node.name}/", 60.0))
    yield process
    process.close()


def _state(rows: int = 6) -> dict[str, object]:
    return {"weights": torch.randn(rows, 8), "step": torch.tensor(3), "lr": 0.25, "names": ["a", "b"]}


def _load(path: Path, like: dict[str, object]) -> dict[str, object]:
    loaded = {key: torch.zeros_like(value) if isinstance(value, torch.Tensor) else None
              for key, value in like.items()}
    dcp.load(loaded, checkpoint_id=path, no_dist=True)
    return loaded


def _bytes_written(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/io").read_text().splitlines() if line.startswith("wchar:"))
    return int(line.split()[1])


def test_writer_process_saves_each_stage_from_shared_memory(writer: WriterClient, tmp_path: Path) -> None:
    stager, state = ReusableHostStager(), _state()
    written_before = _bytes_written(writer.pid)
    committed = writer.save(stager, stager.stage(state), tmp_path / "first", draft_marker(1))
    assert committed is not None and committed.step == 1 and (tmp_path / "first" / COMMIT_FILE).exists()
    assert _bytes_written(writer.pid) - written_before >= state["weights"].nbytes, "the child wrote the shards"

    state["weights"].mul_(-2.0)  # an in-place update: same buffers, new bytes
    state["lr"] = 0.5
    writer.save(stager, stager.stage(state), tmp_path / "second", draft_marker(2))
    loaded = _load(tmp_path / "second", state)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["lr"] == 0.5

    state["weights"] = torch.randn(9, 8)  # a new layout: new staging memory, mapped again
    writer.save(stager, stager.stage(state), tmp_path / "third", draft_marker(3))
    assert stager.generation == 2
    assert torch.equal(_load(tmp_path / "third", state)["weights"], state["weights"])
    stager.close()


def test_mapped_staging_memory_is_ready_before_the_first_save() -> None:
    """The writer builds its views of the staging memory when it is mapped: the first save does not pay for it."""
    stager, state = ReusableHostStager(), _state()
    staged = stager.stage(state)
    writer = WriterState()  # in this process: the child's state between messages
    writer.map(os.dup(stager.arena.fd), stager.arena.nbytes, stager.refs)
    seen = fill_slots(stager.slotted(staged), writer.tensors)
    assert torch.equal(seen["weights"], state["weights"]) and torch.equal(seen["step"], state["step"])
    state["weights"].add_(1.0)
    stager.stage(state)  # the next stage shows through the same views
    assert torch.equal(seen["weights"], state["weights"])
    stager.close()


def test_memory_that_cannot_be_mapped_fails_the_next_save_with_the_reason(tmp_path: Path) -> None:
    stager = ReusableHostStager()
    stager.stage(_state())
    writer = WriterState()
    past_the_end = TensorRef(stager.arena.nbytes, torch.float32, (10,), None)
    writer.map(os.dup(stager.arena.fd), stager.arena.nbytes, [past_the_end])
    with pytest.raises(RuntimeError, match="could not map the staging memory: .*invalid for input of size 0"):
        writer.save({}, str(tmp_path / "step"), draft_marker(1))
    assert not (tmp_path / "step").exists()
    stager.close()


def test_failed_save_is_reported_and_the_writer_keeps_serving(writer: WriterClient, tmp_path: Path) -> None:
    stager, state = ReusableHostStager(), _state()
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(SaveFailed, match="Not a directory"):
        writer.save(stager, stager.stage(state), tmp_path / "a-file" / "step", draft_marker(1))
    assert writer.save(stager, stager.stage(state), tmp_path / "ok", draft_marker(2)) is not None
    stager.close()


def test_writer_ignores_sigterm_and_reports_its_death(writer: WriterClient, tmp_path: Path) -> None:
    stager, state = ReusableHostStager(), _state()
    os.kill(writer.pid, signal.SIGTERM)  # Kubernetes' stop signal is the trainer's to handle, not the writer's
    assert writer.save(stager, stager.stage(state), tmp_path / "after-sigterm", draft_marker(1)) is not None
    os.kill(writer.pid, signal.SIGKILL)
    with pytest.raises(WriterProcessDied, match=f"pid {writer.pid}"):
        writer.save(stager, stager.stage(state), tmp_path / "after-kill", draft_marker(2))
    stager.close()


def test_writer_dies_with_its_trainer(store: dist.TCPStore) -> None:
    """Killed mid-save, a trainer takes its writer with it: a writer left running could still commit.

    The trainer's end of the socket is kept open by a stand-in process (``sleep``), as it would
    look to a writer busy saving; only the parent-death signal can end it then.
    """
    trainer_script = textwrap.dedent(f"""
        import os, subprocess, time
        from trainer.checkpoint.wire import Hello
        from trainer.checkpoint.writer_client import WriterClient
        writer = WriterClient(Hello(0, 1, "127.0.0.1", {store.port}, "orphan/", 60.0))
        os.set_inheritable(writer._sock.fileno(), True)
        holder = subprocess.Popen(["sleep", "600"], close_fds=False)
        print(writer.pid, holder.pid, flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", trainer_script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child, holder = map(int, trainer.stdout.readline().split())
    try:
        assert _alive(child)
        trainer.kill()  # SIGKILL: no cleanup runs in the trainer
        trainer.wait()
        wait_for(lambda: not _alive(child), 10, "the writer process to die with its trainer")
    finally:
        trainer.kill()
        os.kill(holder, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return status != "Z"  # a zombie has exited; only its parent's wait is missing


def test_writer_that_cannot_join_its_group_is_unavailable(tmp_path: Path) -> None:
    unused_port = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = unused_port.port
    del unused_port  # nothing listens there now
    started = time.monotonic()
    with pytest.raises(WriterUnavailable, match="could not join the writers' group"):
        WriterClient(Hello(0, 1, "127.0.0.1", port, "nobody/", 3.0))
    assert time.monotonic() - started < 60
