"""The storage writers: DCP ``FileSystemWriter``s that checksum what they write and commit the checkpoint.

Each rank digests its shard files as it writes them (no second read) and leaves
a small digest file. DCP calls ``finish`` on the coordinator only after every
rank's ``write_data`` returned, so that is where the commit marker is written:
a checkpoint is committed exactly when all ranks' files are durable.

``CommittingWriter`` does that around DCP's own write loop. ``FastCommittingWriter`` (the
default, on a tested torch) also replaces the loop: the files are laid out exactly as DCP's
own writer lays them out (stock readers load them), each item's ``torch.save`` record comes
from the record cache (``records``), and each file goes out in a few ``writev`` calls,
handed to the disk as they return.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from trainer.checkpoint import torch_compat
from trainer.checkpoint.frames import framing_alignment
from trainer.checkpoint.integrity import BlockDigests, file_digest
from trainer.checkpoint.layout import COMMIT_FILE, DIGEST_SUFFIX, delete_step_dir, write_json_atomic
from trainer.checkpoint.marker import CommitMarker
from trainer.checkpoint.records import ItemRecords
from trainer.checkpoint.torch_compat import StorageInfo, WriteLoopWriter


class _DigestingStream:
    """File proxy that keeps running block checksums and the size of every byte written."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.digests = BlockDigests()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digests.update(view)
        return self._raw.write(view)

    def write_all(self, views: list[memoryview]) -> None:
        """Write many byte views (format ``B``) in order: a ``writev`` per ``WRITEBACK_BYTES``, each
        handed to the disk right away (see ``_start_writeback``)."""
        self._raw.flush()
        descriptor = self._raw.fileno()
        for batch in _batches(views, WRITEBACK_BYTES, _IOV_MAX):
            start = self.digests.size  # the stream is append-only: bytes digested = file offset
            for view in batch:
                self.digests.update(view)
            _writev_fully(descriptor, batch)
            _start_writeback(descriptor, start, self.digests.size - start)

    def seek(self, *args: Any) -> int:
        raise OSError("checkpoint streams are append-only")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


_METADATA_TMP = ".metadata.tmp"  # where FileSystemWriter.finish writes .metadata before renaming it
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
WRITEBACK_BYTES = 32 * 1024 * 1024


def _batches(views: list[memoryview], max_bytes: int, max_count: int) -> Iterator[list[memoryview]]:
    """``views`` in order, cut into batches of at most ``max_bytes`` and ``max_count`` views."""
    batch: list[memoryview] = []
    size = 0
    for view in views:
        while len(view):
            piece = view[:max_bytes - size]
            batch.append(piece)
            size += len(piece)
            view = view[len(piece):]
            if size == max_bytes or len(batch) == max_count:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _start_writeback(descriptor: int, offset: int, length: int) -> None:
    """Have the kernel start writing just-written pages to disk now, not at the final ``fsync``.

    Linux starts writeback for ``POSIX_FADV_DONTNEED``, so the disk works while later bytes are
    still being copied into the page cache, and the ``fsync`` waits only for the tail. It also
    keeps a checkpoint's dirty pages from piling up in memory. Elsewhere this does nothing.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(descriptor, offset, length, os.POSIX_FADV_DONTNEED)


def _writev_fully(descriptor: int, views: list[memoryview]) -> None:
    """``os.writev`` until every byte is out: a regular file may take a short write (signal, quota)."""
    while views:
        written = os.writev(descriptor, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views = views[1:]
        if views and written:
            views = [views[0][written:], *views[1:]]


class _DigestingFileSystem(FileSystem):
    def __init__(self, on_close: Callable[[str, dict[str, Any]], None]) -> None:
        super().__init__()
        self._on_close = on_close

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _DigestingStream(raw)
            yield stream
        self._on_close(Path(path).name, stream.digests.entry())


@contextmanager
def zip_checksums(enabled: bool) -> Iterator[None]:
    """Switch the CRC32 that ``torch.save`` computes per zip record on or off, then restore it.

    The writers turn it off while our own checksum runs: our digest already covers every byte of
    every file, at a fraction of miniz's cost, and ``torch.load`` does not check zip CRCs. The
    switch is process-wide: nothing else in a training process calls ``torch.save`` while a
    checkpoint is being written.
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class CommittingWriter(FileSystemWriter):
    """Writes one DCP checkpoint directory with DCP's own write loop and, on the coordinator, its
    commit marker: ``draft`` completed with the files, sizes and timings, then ``on_commit``.
    """

    def __init__(self, path: Path, draft: CommitMarker, on_commit: Callable[[CommitMarker], None] | None = None,
                 records: ItemRecords | None = None) -> None:
        super().__init__(path, overwrite=True)
        self.fs = _DigestingFileSystem(self._record_digest)
        self._digests: dict[str, dict[str, Any]] = {}
        self._draft = draft
        self._on_commit = on_commit
        self._started = time.time()

    def _record_digest(self, name: str, digest: dict[str, Any]) -> None:
        self._digests[name] = digest

    def prepare_local_plan(self, plan: Any) -> Any:
        # Saving step S replaces whatever was at S (a crash's partial files must not mix with ours).
        if self.rank in (0, None) and Path(self.path).exists():
            delete_step_dir(Path(self.path))
        return super().prepare_local_plan(plan)

    def write_data(self, plan: Any, planner: Any) -> Any:
        Path(self.path).mkdir(parents=True, exist_ok=True)
        with zip_checksums(False):
            future = super().write_data(plan, planner)
        future.wait()
        # Only the coordinator's finish reads this file, and copies it into commit.json, which is
        # fsync'd: a crash before the commit voids the whole directory, so no fsync here.
        digest_file = Path(self.path) / f".rank-{self.rank or 0}{DIGEST_SUFFIX}"
        digest_file.write_text(json.dumps(self._digests))
        return future

    def finish(self, metadata: Any, results: Any) -> None:
        # DCP sends ``metadata`` back to every rank after this returns. The storage locations
        # belong in the file only (half its bytes, most of its unpickling), so a copy gets them.
        super().finish(dataclasses.replace(metadata), results)
        root = Path(self.path)
        written = self._digests.get(_METADATA_TMP)  # digested on the way out: no need to read it back
        files: dict[str, dict[str, Any]] = {".metadata": written or file_digest(root / ".metadata")}
        for digest_file in sorted(root.glob(f".rank-*{DIGEST_SUFFIX}")):
            files.update(json.loads(digest_file.read_text()))
        marker = self._draft.completed(files, created=time.time(), save_seconds=time.time() - self._started)
        write_json_atomic(root / COMMIT_FILE, marker.to_json())
        for digest_file in root.glob(f".rank-*{DIGEST_SUFFIX}"):
            digest_file.unlink()
        if self._on_commit is not None:
            self._on_commit(marker)


class FastCommittingWriter(WriteLoopWriter, CommittingWriter):
    """``CommittingWriter`` with this project's write loop: records from the cache, ``writev`` per file.

    ``records`` is the process's cache of item records, kept across saves.
    """

    def __init__(self, path: Path, draft: CommitMarker, on_commit: Callable[[CommitMarker], None] | None = None,
                 records: ItemRecords | None = None) -> None:
        super().__init__(path, draft, on_commit)
        self._records = records or ItemRecords()

    def write_files(self, planner: SavePlanner, file_queue: queue.Queue) -> Future[list[WriteResult]]:
        """DCP's one-thread write loop, with each item's record taken from the record cache.

        Same layout as DCP's: per file, byte items first, then tensors, each a ``torch.save``
        record at a recorded offset (a view holds only its own bytes, as DCP's clone does, but
        uncopied: see ``frames``). Each file goes out in a few ``writev`` calls instead of three
        writes per tensor.
        """
        if self.transforms.extensions:
            raise ValueError("FastCommittingWriter does not support stream transform extensions")
        results: list[WriteResult] = []
        alignment = framing_alignment()
        with torch.no_grad():  # writing needs no autograd; a DTensor then yields its shard directly
            while not file_queue.empty():
                self._write_file(planner, *file_queue.get_nowait(), results, alignment)
        self._records.keep_only({result.index.fqn for result in results})
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_file(self, planner: SavePlanner, path: str, storage_key: str, items: list[WriteItem],
                    results: list[WriteResult], alignment: int | None) -> None:
        """One shard file: byte items first, then tensors, written in a few ``writev`` calls."""
        ordered = sorted(items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        buffers: list[memoryview] = []
        offset = 0
        for item in ordered:
            pieces = self._records.pieces(planner, item, alignment)
            length = sum(len(piece) for piece in pieces)
            results.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=StorageInfo(storage_key, offset, length)))
            buffers += pieces
            offset += length
        with self.fs.create_stream(path, "wb") as stream:
            stream.write_all(buffers)
            if self.sync_files:
                os.fsync(stream.fileno())


def new_storage_writer(path: Path, draft: CommitMarker, on_commit: Callable[[CommitMarker], None] | None = None,
                       records: ItemRecords | None = None) -> CommittingWriter:
    """The storage writer saves use: the fast one, or DCP's loop where torch is outside the tested range."""
    if torch_compat.fast_paths():
        return FastCommittingWriter(path, draft, on_commit, records)
    return CommittingWriter(path, draft, on_commit)
