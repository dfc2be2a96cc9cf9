"""The documents in a user's input files: plain text, JSON Lines and Parquet, streamed.

A plain-text file is one document; a ``.jsonl`` line or a Parquet row is one, taken from the
text field. Inputs are read lazily, in order, so a folder of many GB never has to fit in memory,
and a bad input is one line naming the file (and line) and the fix.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from trainer.errors import UserError

log = logging.getLogger("fsdp_train")

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH_ROWS = 1024


class NonUtf8(str, Enum):
    ERROR = "error"  # stop, naming the file
    SKIP = "skip"  # leave the file (or line) out and count it


@dataclass(frozen=True)
class SourceOptions:
    text_field: str = "text"
    globs: tuple[str, ...] = ()  # more plain-text file patterns to take from folders
    excludes: tuple[str, ...] = ()  # path patterns to leave out
    non_utf8: NonUtf8 = NonUtf8.ERROR


def _wanted(path: Path, options: SourceOptions) -> bool:
    name = path.name
    return (path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
            or any(fnmatch.fnmatch(name, pattern) for pattern in options.globs))


def _excluded(path: Path, options: SourceOptions) -> bool:
    return any(fnmatch.fnmatch(str(path), pattern) for pattern in options.excludes)


def discover(inputs: list[str], options: SourceOptions) -> list[Path]:
    """The files to read, in a stable order: each named file, and the wanted files under each folder."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _wanted(p, options)
                           and not _excluded(p, options))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {raw}: no such file or folder; pass text, .jsonl or .parquet files or folders")
    if not files:
        raise UserError(f"inputs {' '.join(inputs)}: no files to read (plain text: {', '.join(TEXT_SUFFIXES)}, "
                        ".jsonl, .parquet); add --glob PATTERN for other plain-text names")
    return files


class DocumentReader:
    """Yields the documents of the files in order; counts what ``non_utf8=skip`` left out."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        self.skipped = 0

    def documents(self, files: list[Path]) -> Iterator[str]:
        for path in files:
            if path.suffix in JSONL_SUFFIXES:
                yield from self._jsonl(path)
            elif path.suffix in PARQUET_SUFFIXES:
                yield from self._parquet(path)
            else:
                text = self._decode(path.read_bytes(), str(path))
                if text is not None:
                    yield text

    def _decode(self, raw: bytes, where: str) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.options.non_utf8 is NonUtf8.SKIP:
                self.skipped += 1
                return None
            raise UserError(f"{where}: not UTF-8 (byte {exc.start}); convert it, or pass --non-utf8 skip to "
                            "leave such inputs out") from None

    def _jsonl(self, path: Path) -> Iterator[str]:
        field = self.options.text_field
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                where = f"{path}:{number}"
                line = self._decode(raw, where)
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{where}: not JSON ({exc.msg}); fix or remove the line") from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{where}: no text field {field!r}; pass --text-field NAME to name it")
                yield text

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        field = self.options.text_field
        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
            raise UserError(f"{path}: not a Parquet file ({exc}); pass a .parquet file") from None
        if field not in table.schema_arrow.names:
            raise UserError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                            "pass --text-field NAME")
        for batch in table.iter_batches(columns=[field], batch_size=PARQUET_BATCH_ROWS):
            for text in batch.column(0).to_pylist():
                if text:
                    yield str(text)
