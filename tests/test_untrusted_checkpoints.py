"""A checkpoint from elsewhere is data, never code: every reader refuses what a crafted one asks for.

Each crafted checkpoint carries a payload that would create a marker file if it ever ran. The
controls show the payload is real (stock DCP runs it); every one of this project's paths must
refuse it in one line, and the marker must never appear.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from conftest import ckpt_list, error_lines, run_cli, start_records
from trainer.checkpoint import integrity, safe_read, torch_compat
from trainer.checkpoint.failures import user_error_inside
from trainer.checkpoint.layout import COMMIT_FILE, step_dir
from trainer.checkpoint.range_reader import RangeReader
from trainer.checkpoint.reader import read_state, read_tensors
from trainer.checkpoint.safe_read import METADATA_FILE, SafeLoadPlanner, SafeReader, UnsafeCheckpoint

FLAGS = ["--global-batch-size", "8", "--checkpoint-every", "2"]


class RunsCode:
    """Unpickling this runs code: it writes ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('the payload ran')",)


def forge_marker(checkpoint: Path) -> None:
    """Rewrite ``commit.json`` so that its sizes and checksums match the files as they are now,
    as whoever crafted the checkpoint would."""
    marker = json.loads((checkpoint / COMMIT_FILE).read_text())
    marker["files"] = {path.name: integrity.file_digest(path) for path in checkpoint.iterdir()
                       if path.is_file() and path.name != COMMIT_FILE}
    marker["bytes"] = sum(entry["bytes"] for entry in marker["files"].values())
    (checkpoint / COMMIT_FILE).write_text(json.dumps(marker))


def assert_refused(proc, *needles: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    output = error_lines(proc.stderr) if code == 2 else [line for line in proc.stdout.splitlines() if "refused" in line]
    assert len(output) == 1, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in output[0], output[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run written at world size 2: checkpoints at steps 2 and 4."""
    ckpt = tmp_path_factory.mktemp("trusted") / "ckpt"
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "4", "--checkpoint-dir", str(ckpt), check=True)
    return ckpt


@pytest.fixture
def poisoned(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run whose newest checkpoint's .metadata runs code, with a commit.json to match."""
    ckpt, ran = tmp_path / "ckpt", tmp_path / "payload-ran"
    shutil.copytree(run, ckpt)
    (step_dir(ckpt, 4) / METADATA_FILE).write_bytes(pickle.dumps(RunsCode(ran)))
    forge_marker(step_dir(ckpt, 4))
    return ckpt, ran


@pytest.mark.torchrun
def test_control_stock_dcp_runs_the_payload(poisoned) -> None:
    ckpt, ran = poisoned
    with pytest.raises(AttributeError):  # the payload's exec() returns None, which is no Metadata
        FileSystemReader(step_dir(ckpt, 4)).read_metadata()
    assert ran.exists(), "the payload must be real, or the tests below prove nothing"


@pytest.mark.torchrun
@pytest.mark.parametrize("command", ["show", "verify", "verify-newest", "diff", "convert", "infer"])
def test_operator_tools_refuse_a_metadata_payload(poisoned, tmp_path: Path, command: str) -> None:
    ckpt, ran = poisoned
    target = str(step_dir(ckpt, 4))
    args = {"show": ["ckpt", "show", target], "verify": ["ckpt", "verify", target],
            "verify-newest": ["ckpt", "verify", "--newest", str(ckpt)],  # what the chart's `helm test` runs
            "diff": ["ckpt", "diff", str(step_dir(ckpt, 2)), target],
            "convert": ["convert", "dcp-to-torch", target, str(tmp_path / "out.pth")],
            "infer": ["infer", target, "--input", ",".join(["0.5"] * 16)]}[command]
    proc = run_cli(*args)
    assert_refused(proc, f"{target}/{METADATA_FILE}", "refused to unpickle builtins.exec",
                   code=1 if command.startswith("verify") else 2)
    assert not ran.exists(), "the payload ran"


@pytest.mark.torchrun
def test_resume_refuses_a_metadata_payload_even_with_a_matching_marker(poisoned) -> None:
    ckpt, ran = poisoned
    proc = run_cli("local", "--nproc", "2", "--max-restarts", "0", *FLAGS, "--max-steps", "6",
                   "--checkpoint-dir", str(ckpt))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fsdp-train: error:")]
    assert len(ours) == 1, proc.stderr[-3000:]  # the workers' one line (torchrun then reports their exit)
    assert f"{step_dir(ckpt, 4)}/{METADATA_FILE}" in ours[0] and "refused to unpickle builtins.exec" in ours[0]
    assert not ran.exists(), "the payload ran"


@pytest.mark.torchrun
def test_resume_verifies_metadata_before_it_unpickles_it(run: Path, poisoned,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the honest marker (it records the real .metadata, not the payload), the altered file
    fails its checksum and reaches no unpickler: the job skips it as damaged and resumes from step 2."""
    ckpt, ran = poisoned
    shutil.copy(step_dir(run, 4) / COMMIT_FILE, step_dir(ckpt, 4) / COMMIT_FILE)
    recorded = json.loads((step_dir(ckpt, 4) / COMMIT_FILE).read_text())["files"][METADATA_FILE]
    unpickled: list[int] = []
    real = torch_compat.load_dcp_metadata
    monkeypatch.setattr(safe_read, "load_dcp_metadata", lambda data: unpickled.append(len(data)) or real(data))
    with pytest.raises(safe_read.DamagedMetadata, match="recorded at commit"):
        SafeReader(step_dir(ckpt, 4), recorded).read_metadata()
    assert unpickled == [], "a .metadata whose checksum differs must not reach any unpickler"
    run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "6", "--checkpoint-dir", str(ckpt), check=True)
    assert start_records(ckpt)[-1]["resumed_from"] == {"step": 2, "world_size": 2}
    assert not ran.exists(), "the payload ran"


@pytest.mark.torchrun
def test_offline_and_range_readers_refuse_a_metadata_payload(poisoned) -> None:
    ckpt, ran = poisoned
    with pytest.raises(UnsafeCheckpoint, match="refused to unpickle builtins.exec"):
        read_tensors(step_dir(ckpt, 4))
    with pytest.raises(BaseException) as raised:  # dcp.load wraps what the reader raises
        dcp.load({"x": torch.zeros(1)}, storage_reader=RangeReader(step_dir(ckpt, 4)), no_dist=True)
    assert isinstance(user_error_inside(raised.value), UnsafeCheckpoint)
    assert not ran.exists(), "the payload ran"


def _metadata_naming(checkpoint: Path, relative_path: str) -> None:
    """Rewrite .metadata, valid as DCP metadata, so that every item lives in ``relative_path``."""
    metadata = safe_read.read_metadata(checkpoint)
    metadata.storage_data = {index: dataclasses.replace(info, relative_path=relative_path)
                             for index, info in metadata.storage_data.items()}
    (checkpoint / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    forge_marker(checkpoint)


@pytest.mark.torchrun
@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_files_named_by_the_metadata_stay_inside_the_checkpoint(run: Path, tmp_path: Path, escape: str) -> None:
    checkpoint = tmp_path / "step"
    shutil.copytree(step_dir(run, 4), checkpoint)
    outside = tmp_path / "outside"
    shutil.copy(checkpoint / "__0_0.distcp", outside)
    if escape == "symlink":
        (checkpoint / "__0_0.distcp").unlink()
        (checkpoint / "__0_0.distcp").symlink_to(outside)
        forge_marker(checkpoint)
        named = "__0_0.distcp"
    else:
        named = "../outside" if escape == "dotdot" else str(outside)
        _metadata_naming(checkpoint, named)
    for args in (["ckpt", "show", str(checkpoint)],
                 ["convert", "dcp-to-torch", str(checkpoint), str(tmp_path / "o.pth")],
                 ["infer", str(checkpoint), "--input", ",".join(["0.5"] * 16)]):
        assert_refused(run_cli(*args), f"names the file {named!r}, which is outside the checkpoint directory")


def test_bytes_items_are_loaded_weights_only(tmp_path: Path) -> None:
    ran = tmp_path / "payload-ran"
    stock = tmp_path / "stock"
    dcp.save({"weights": torch.ones(3), "evil": RunsCode(ran)}, checkpoint_id=stock, no_dist=True)
    proc = run_cli("convert", "dcp-to-torch", str(stock), str(tmp_path / "out.pth"))
    assert_refused(proc, f"{stock}: item 'evil'", "refused to unpickle")
    with pytest.raises(BaseException) as raised:
        dcp.load({"weights": torch.zeros(3), "evil": None}, storage_reader=SafeReader(stock),
                 planner=SafeLoadPlanner(stock), no_dist=True)
    assert isinstance(user_error_inside(raised.value), UnsafeCheckpoint)
    assert not ran.exists(), "the payload ran"
    dcp.load({"weights": torch.zeros(3), "evil": None}, checkpoint_id=stock, no_dist=True)
    assert ran.exists(), "control: DCP's own planner runs the payload"


def test_stock_dcp_checkpoints_still_load_as_data(tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(4, 3), "b": torch.arange(3).to(torch.bfloat16)},
             "optim": {"param_groups": [{"lr": 0.5, "betas": (0.9, 0.99), "params": ["w", "b"]}]}, "step": 7}
    dcp.save(state, checkpoint_id=tmp_path / "stock", no_dist=True)
    loaded = read_state(tmp_path / "stock")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["model"]["b"], state["model"]["b"])
    assert loaded["optim"]["param_groups"] == state["optim"]["param_groups"] and loaded["step"] == 7


@pytest.mark.torchrun
@pytest.mark.parametrize("damage", ["truncated", "oversized", "wrong-type", "file-outside"])
def test_a_malformed_marker_makes_the_checkpoint_uncommitted(run: Path, tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run, ckpt)
    marker_file = step_dir(ckpt, 4) / COMMIT_FILE
    text = marker_file.read_text()
    marker = json.loads(text)
    if damage == "truncated":
        marker_file.write_text(text[: len(text) // 2])
    elif damage == "oversized":
        marker_file.write_text(json.dumps({**marker, "padding": "x" * (5 << 20)}))
    elif damage == "wrong-type":
        marker_file.write_text(json.dumps({**marker, "world_size": "two"}))
    else:
        marker["files"]["../../etc/passwd"] = marker["files"].pop(METADATA_FILE)
        marker_file.write_text(json.dumps(marker))
    listed = run_cli("ckpt", "list", str(ckpt), "--json", check=True)
    assert {row["step"]: row["committed"] for row in json.loads(listed.stdout)} == {2: True, 4: False}
    warnings = [line for line in listed.stderr.splitlines() if "not a valid commit marker" in line]
    assert len(warnings) == 1 and str(marker_file) in warnings[0] and "Traceback" not in listed.stderr
    assert_refused(run_cli("ckpt", "show", str(step_dir(ckpt, 4))), "not a committed checkpoint")
    if damage == "truncated":  # a resume passes over it to the intact step 2
        run_cli("local", "--nproc", "2", *FLAGS, "--max-steps", "6", "--checkpoint-dir", str(ckpt), check=True)
        assert start_records(ckpt)[-1]["resumed_from"] == {"step": 2, "world_size": 2}
        assert [row["step"] for row in ckpt_list(ckpt) if row["committed"]][-1] == 6
