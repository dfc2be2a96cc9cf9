"""A DCP ``FileSystemWriter`` that checksums what it writes and commits the checkpoint.

Each rank digests its shard files as it writes them (no second read) and leaves
a small digest file. DCP calls ``finish`` on the coordinator only after every
rank's ``write_data`` returned, so that is where the commit marker is written:
a checkpoint is committed exactly when all ranks' files are durable.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from trainer.checkpoint.integrity import ALGORITHM, file_digest, new_hasher
from trainer.checkpoint.layout import COMMIT_FILE, DIGEST_SUFFIX, remove_tree, write_json_atomic


class _DigestingStream:
    """File proxy that keeps a running checksum and size of every byte written."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.hasher = new_hasher()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        return self._raw.write(view)

    def seek(self, *args: Any) -> int:
        raise OSError("checkpoint streams are append-only")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _DigestingFileSystem(FileSystem):
    def __init__(self, on_close: Callable[[str, dict[str, int]], None]) -> None:
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
        self._on_close(Path(path).name, {"bytes": stream.size, ALGORITHM: stream.hasher.hexdigest()})


@contextmanager
def _without_zip_checksums() -> Iterator[None]:
    """Skip the CRC32 that ``torch.save`` computes per zip record while our own checksum runs.

    Our digest already covers every byte of every file, at a fraction of miniz's cost, and
    ``torch.load`` does not check zip CRCs. The switch is process-wide: nothing else in a
    training process calls ``torch.save`` while a checkpoint is being written.
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class CommittingWriter(FileSystemWriter):
    """Writes one DCP checkpoint directory and, on the coordinator, its commit marker.

    ``marker`` is the commit marker's content minus what only the writer knows
    (files, bytes, timings); ``on_commit`` runs on the coordinator afterwards.
    """

    def __init__(self, path: Path, marker: dict[str, Any], on_commit: Callable[[dict], None] | None = None,
                 thread_count: int = 1) -> None:
        super().__init__(path, thread_count=thread_count, overwrite=True)
        self.fs = _DigestingFileSystem(self._record_digest)
        self._digests: dict[str, dict[str, int]] = {}
        self._marker = marker
        self._on_commit = on_commit
        self._started = time.time()

    def _record_digest(self, name: str, digest: dict[str, int]) -> None:
        self._digests[name] = digest

    def prepare_local_plan(self, plan: Any) -> Any:
        # Saving step S replaces whatever was at S (a crash's partial files must not mix with ours).
        if self.rank in (0, None) and Path(self.path).exists():
            remove_tree(Path(self.path))
        return super().prepare_local_plan(plan)

    def write_data(self, plan: Any, planner: Any) -> Any:
        Path(self.path).mkdir(parents=True, exist_ok=True)
        with _without_zip_checksums():
            future = super().write_data(plan, planner)
        future.wait()
        digest_file = Path(self.path) / f".rank-{self.rank or 0}{DIGEST_SUFFIX}"
        with digest_file.open("w") as out:
            json.dump(self._digests, out)
            out.flush()
            os.fsync(out.fileno())
        return future

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)
        root = Path(self.path)
        files: dict[str, dict[str, int]] = {".metadata": file_digest(root / ".metadata")}
        for digest_file in sorted(root.glob(f".rank-*{DIGEST_SUFFIX}")):
            files.update(json.loads(digest_file.read_text()))
        marker = {
            **self._marker,
            "files": files,
            "bytes": sum(entry["bytes"] for entry in files.values()),
            "created": round(time.time(), 3),
            "save_seconds": round(time.time() - self._started, 3),
        }
        write_json_atomic(root / COMMIT_FILE, marker)
        for digest_file in root.glob(f".rank-*{DIGEST_SUFFIX}"):
            digest_file.unlink()
        if self._on_commit is not None:
            self._on_commit(marker)
