"""One test per torch internal the checkpoint engine relies on (``trainer/checkpoint/torch_compat.py``).

A torch upgrade that changes one of them fails the test named after it. The last test keeps
the rule that makes this list complete: nothing else in ``trainer/`` or ``bench/`` touches a
private torch name.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import io
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.tensor import DeviceMesh, DTensor, Shard

from conftest import ROOT, draft_marker
from trainer.checkpoint import integrity, planner, range_reader, storage, torch_compat
from trainer.checkpoint.layout import read_marker
from trainer.checkpoint.safe_read import SafeReader
from trainer.checkpoint.storage import zip_checksums


def _torch_save_bytes(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mesh():
    """A world of one (gloo) in this process, for DTensors."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DeviceMesh("cpu", [0])
    dist.destroy_process_group()


# ---- the version gate --------------------------------------------------------------------------
def test_fast_paths_are_on_for_the_tested_torch_only() -> None:
    assert torch_compat.fast_paths(), f"torch {torch.__version__} is the pinned one: the fast paths must be on"
    assert torch_compat.fast_paths_supported("2.13.0+cpu") and torch_compat.fast_paths_supported("2.13.1")
    for other in ("2.12.1", "2.14.0", "3.0.0a0", "2.130.0"):
        assert not torch_compat.fast_paths_supported(other), other


def test_outside_the_tested_range_one_warning_then_the_stock_paths(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    torch_compat.fast_paths.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"torch 2\.99\.0 is outside .* stock writer, planner and reader"):
            assert not torch_compat.fast_paths()
        writer = storage.new_storage_writer(tmp_path, draft_marker(1))
        assert type(writer) is storage.CommittingWriter, "DCP's own write loop, not this project's"
        assert type(planner.new_save_planner()) is DefaultSavePlanner
        state = {"rows": torch.randn(40, 8), "narrowed": torch.randn(9, 3)[2:6], "count": 4}
        dcp.save(state, storage_writer=writer, planner=planner.new_save_planner(), no_dist=True)
        marker = read_marker(tmp_path)
        assert marker is not None and integrity.problems(tmp_path, marker.files) == []
        loaded = {"rows": torch.zeros(40, 8), "narrowed": torch.zeros(4, 3), "count": 0}
        reader = range_reader.new_storage_reader(tmp_path)
        assert type(reader) is SafeReader, "DCP's own read loop, reading the checkpoint as data"
        dcp.load(loaded, storage_reader=reader, no_dist=True)
        assert torch.equal(loaded["rows"], state["rows"]) and torch.equal(loaded["narrowed"], state["narrowed"])
        assert loaded["count"] == 4
        targets = [torch.zeros(3), torch.zeros(2, dtype=torch.int64)]
        torch_compat.copy_all(targets, [torch.ones(3), torch.tensor([5, 6])])
        assert targets[0].tolist() == [1.0] * 3 and targets[1].tolist() == [5, 6]
    finally:
        monkeypatch.undo()
        torch_compat.fast_paths.cache_clear()


# ---- DTensor -----------------------------------------------------------------------------------
def test_local_shard_is_the_dtensor_s_own_tensor_object(mesh: DeviceMesh) -> None:
    """Record and planner caches compare the shard by identity and address across saves."""
    local = torch.randn(4, 3, requires_grad=True)
    sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    assert torch.is_grad_enabled(), "with grad on, to_local itself returns a new view each call"
    shard = torch_compat.local_shard(sharded)
    assert shard is torch_compat.local_shard(sharded), "the same object every call"
    assert shard.data_ptr() == local.data_ptr() and shard.shape == local.shape
    plain = torch.randn(2)
    assert torch_compat.local_shard(plain) is plain


def test_foreach_copy_copies_every_pair_in_one_call() -> None:
    sources = [torch.randn(5), torch.arange(4), torch.randn(2, 3).to(torch.bfloat16)]
    targets = [torch.empty_like(source) for source in sources]
    torch_compat.copy_all(targets, sources)
    assert all(torch.equal(target, source) for target, source in zip(targets, sources))
    assert hasattr(torch, "_foreach_copy_")


# ---- DCP's planner and write loop --------------------------------------------------------------
def test_plan_cache_holds_the_local_plan_of_the_last_successful_save(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``LayoutCachingSavePlanner`` hands DCP the cached plan and an unusable delta, as DCP itself
    does for an unchanged plan: that needs the cached plan to be the accepted one."""
    made: list = []
    create = DefaultSavePlanner.create_local_plan
    monkeypatch.setattr(DefaultSavePlanner, "create_local_plan", lambda self: made.append(create(self)) or made[-1])

    class CompatProbePlanner(DefaultSavePlanner):  # its own cache key: the class name
        pass

    probe = CompatProbePlanner(enable_plan_caching=True)
    assert torch_compat.accepted_local_plan(probe) is None, "nothing cached before a save"
    dcp.save({"rows": torch.randn(6, 2)}, checkpoint_id=tmp_path / "first", planner=probe, no_dist=True)
    assert made[-1].usable and torch_compat.accepted_local_plan(probe) is made[-1]
    dcp.save({"rows": torch.randn(6, 2)}, checkpoint_id=tmp_path / "second", planner=probe, no_dist=True)
    assert not made[-1].usable, "an unchanged local plan is sent as an unusable delta"
    assert torch_compat.accepted_local_plan(probe) is made[0], "the accepted plan stays cached"


def test_dcp_write_data_hands_its_file_queue_to_the_write_loop_hook(tmp_path: Path) -> None:
    seen: list[int] = []

    class Probe(torch_compat.WriteLoopWriter):
        def write_files(self, planner, file_queue):
            seen.append(file_queue.qsize())
            return super().write_files(planner, file_queue)

    state = {"rows": torch.randn(6, 2), "count": 3}
    dcp.save(state, storage_writer=Probe(tmp_path), no_dist=True)
    assert seen == [1], "one queue, holding this rank's one shard file"
    loaded = {"rows": torch.zeros(6, 2), "count": 0}
    dcp.load(loaded, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(loaded["rows"], state["rows"]) and loaded["count"] == 3


def test_storage_info_is_what_dcp_records_for_each_item(tmp_path: Path) -> None:
    dcp.save({"rows": torch.randn(3, 2), "count": 1}, checkpoint_id=tmp_path, no_dist=True)
    metadata = FileSystemReader(tmp_path).read_metadata()
    infos = list(metadata.storage_data.values())
    assert infos and all(type(info) is torch_compat.StorageInfo for info in infos)
    made = torch_compat.StorageInfo("__0_0.distcp", 10, 20)
    assert (made.relative_path, made.offset, made.length) == ("__0_0.distcp", 10, 20)


# ---- torch.save's output -----------------------------------------------------------------------
def test_storage_alignment_is_where_torch_save_starts_each_storage_record() -> None:
    alignment = torch_compat.storage_alignment()
    assert isinstance(alignment, int) and alignment >= 1
    with zip_checksums(False):
        for tensor in (torch.randn(7), torch.arange(3), torch.tensor(2.0)):
            raw = _torch_save_bytes(tensor)
            layout = torch_compat.saved_tensor_layout(io.BytesIO(raw), 0, len(raw))
            assert layout.data_start % alignment == 0


def test_torch_save_writes_a_storage_as_one_write_inside_a_value_independent_frame() -> None:
    with zip_checksums(False):
        first, second = torch.randn(6, 5), torch.randn(6, 5)
        frame, _parts = torch_compat.record_torch_save(first)
        assert frame is not None, "the storage bytes no longer come as exactly one write"
        head, tail = frame
        assert head + first.numpy().tobytes() + tail == _torch_save_bytes(first)
        assert torch_compat.record_torch_save(second)[0] == frame, "the frame must not depend on the values"
        assert head + second.numpy().tobytes() + tail == _torch_save_bytes(second)


def test_torch_save_pickle_rebuilds_a_tensor_through_the_name_parsed() -> None:
    with zipfile.ZipFile(io.BytesIO(_torch_save_bytes(torch.randn(3)))) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    globals_named = [arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    module, name = torch_compat.REBUILD_TENSOR
    assert f"{module} {name}" in globals_named
    assert callable(getattr(importlib.import_module(module), name))


def test_torch_save_zip_layout_is_as_parsed() -> None:
    """Rows of a saved tensor are one byte range of its storage record, found from the zip directory."""
    base = torch.randn(10, 4)
    view = base[3:7]  # torch.save keeps the whole storage and an offset
    with zip_checksums(False):
        raw = _torch_save_bytes(view)
    padded = b"x" * 100 + raw + b"y" * 50  # an item inside a larger shard file
    layout = torch_compat.saved_tensor_layout(io.BytesIO(padded), 100, len(raw))
    assert (layout.size, layout.stride) == ((4, 4), (4, 1))
    assert padded[layout.data_start:layout.data_start + view.nbytes] == view.contiguous().numpy().tobytes()
    assert layout.data_end - layout.data_start == (base.numel() - view.storage_offset()) * 4, \
        "the record holds the whole storage, and the view starts at its offset"
    with pytest.raises(torch_compat.NotAPlainTensor):
        torch_compat.saved_tensor_layout(io.BytesIO(padded), 0, 100)


# ---- DCP's metadata pickle ---------------------------------------------------------------------
def test_dcp_metadata_is_made_of_the_allow_listed_types_only(tmp_path: Path) -> None:
    """What a plain unpickler looks up in stock DCP's and this project's .metadata, for every dtype
    and item kind: a new type in a torch upgrade must be judged and added, or loads are refused."""
    state = {f"t_{dtype}".replace("torch.", ""): torch.zeros(2, 3, dtype=dtype)
             for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool)}
    state.update(scalar=torch.tensor(1.0), count=3, group={"lr": 0.1, "betas": (0.9, 0.99), "names": ["a"]})
    dcp.save(state, checkpoint_id=tmp_path / "stock", no_dist=True)
    dcp.save(state, storage_writer=storage.FastCommittingWriter(tmp_path / "ours", draft_marker(1)), no_dist=True)
    looked_up: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            looked_up.add((module, name))
            return super().find_class(module, name)

    for name in ("stock", "ours"):
        data = (tmp_path / name / ".metadata").read_bytes()
        Recording(io.BytesIO(data)).load()
        assert isinstance(torch_compat.load_dcp_metadata(data), type(FileSystemReader(tmp_path / name).read_metadata()))
    outside = {key for key in looked_up if key not in torch_compat.METADATA_TYPES
               and not (key[0] == "torch" and isinstance(getattr(torch, key[1]), torch.dtype))}
    assert outside == set(), "judge these types and add the safe ones to torch_compat.METADATA_TYPES"
    with pytest.raises(torch_compat.RefusedType, match="builtins.eval"):
        torch_compat.load_dcp_metadata(pickle.dumps(eval))


def test_an_enum_pickled_by_name_loads_and_no_other_getattr_does(tmp_path: Path) -> None:
    """Some Pythons (3.11.2 in the image) pickle enum members as ``getattr(Enum, "NAME")``."""
    dcp.save({"rows": torch.randn(3, 2)}, checkpoint_id=tmp_path, no_dist=True)
    metadata = FileSystemReader(tmp_path).read_metadata()

    class ByName(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, enum.Enum):
                return getattr, (type(obj), obj.name)
            return NotImplemented

    buffer = io.BytesIO()
    ByName(buffer).dump(metadata)
    assert b"getattr" in buffer.getvalue(), "the pickle must take the by-name path"
    loaded = torch_compat.load_dcp_metadata(buffer.getvalue())
    assert loaded.state_dict_metadata["rows"].properties == metadata.state_dict_metadata["rows"].properties
    allowed_enum = next(cls for cls in torch_compat.METADATA_TYPES.values() if isinstance(cls, enum.EnumMeta))
    for evil in ((allowed_enum, "__init__"), (torch.Size, "__class__")):  # not a member; not an enum
        buffer = io.BytesIO()
        pickle.Pickler(buffer).dump(_GetattrCall(*evil))
        with pytest.raises(torch_compat.RefusedType, match="builtins.getattr"):
            torch_compat.load_dcp_metadata(buffer.getvalue())


class _GetattrCall:
    def __init__(self, target: object, name: str) -> None:
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


# ---- the rule ----------------------------------------------------------------------------------
def _private_torch_names(path: Path) -> list[str]:
    """Private torch names a module imports or reads (``torch._x``, ``from torch.x import _y``,
    and the attributes this engine is known to want: a DTensor's shard, DCP's plan cache)."""
    tree = ast.parse(path.read_text())
    torch_names = {"torch"}  # local names bound to torch modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if alias.name.startswith("_") or "._" in node.module:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or "torch")
                    if "._" in alias.name:
                        found.append(f"line {node.lineno}: import {alias.name}")
    known = {"_local_tensor", "_cached_save_plan", "_cached_plans_key", "_write_data", "_get_storage_alignment"}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and (root.id in torch_names or node.attr in known):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _private_torch_overrides(module_name: str) -> list[str]:
    """Methods of the module's classes that override a private method of a torch base class."""
    module = importlib.import_module(module_name)
    found = []
    for cls in vars(module).values():
        if not isinstance(cls, type) or cls.__module__ != module_name:
            continue
        torch_bases = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] == "torch"]
        found += [f"{cls.__name__}.{name} overrides {base.__module__}.{base.__name__}.{name}"
                  for name, value in vars(cls).items() if callable(value) and name.startswith("_")
                  and not name.startswith("__") for base in torch_bases if name in vars(base)]
    return found


def _project_modules() -> dict[str, Path]:
    paths = sorted([*ROOT.joinpath("trainer").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py")])
    return {".".join(path.relative_to(ROOT).with_suffix("").parts): path for path in paths}


def test_no_private_torch_name_outside_torch_compat() -> None:
    offenders = {name: uses for name, path in _project_modules().items()
                 if not name.endswith("torch_compat") and (uses := _private_torch_names(path))}
    assert offenders == {}, "move these into trainer/checkpoint/torch_compat.py, each with a test here"
    compat = _private_torch_names(ROOT / "trainer" / "checkpoint" / "torch_compat.py")
    assert len(compat) >= 5, f"the scan must see the private names torch_compat does use: {compat}"


def test_no_private_torch_method_is_overridden_outside_torch_compat() -> None:
    offenders = {name: found for name in _project_modules() if not name.endswith(("torch_compat", "__main__"))
                 and (found := _private_torch_overrides(name))}
    assert offenders == {}, "override it in trainer/checkpoint/torch_compat.py, behind a public-named hook"
    assert _private_torch_overrides("trainer.checkpoint.torch_compat") == [
        "WriteLoopWriter._write_data overrides torch.distributed.checkpoint.filesystem._FileSystemWriter._write_data"]


def test_the_agents_hooks_find_in_torch_what_they_hook() -> None:
    """trainer/launcher/torch_compat.py: torchrun's agent and torch's multiprocessing, as it uses them."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.multiprocessing.spawn import ProcessContext

    from trainer.launcher import torch_compat

    monitor = inspect.unwrap(LocalElasticAgent._monitor_workers)
    assert list(inspect.signature(monitor).parameters) == ["self", "worker_group"]
    assert "self._remaining_restarts = " in inspect.getsource(SimpleElasticAgent.__init__)
    assert "self._remaining_restarts > 0" in inspect.getsource(SimpleElasticAgent._invoke_run), \
        "end_restarts works by leaving no restart to the failure branch"
    join_all = inspect.unwrap(ProcessContext._join_procs_with_timeout)
    assert list(inspect.signature(join_all).parameters) == ["self", "timeout"]
    assert "_join_procs_with_timeout" in inspect.getsource(ProcessContext.join), "called after a failure"
    agent = type("Agent", (), {"_remaining_restarts": 3})()
    assert torch_compat.restarts_left(agent) == 3
    torch_compat.end_restarts(agent)
    assert torch_compat.restarts_left(agent) == 0
