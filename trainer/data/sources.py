"""The documents in a user's input files: plain text, JSON Lines and Parquet, streamed.

A plain-text file is one document; a ``.jsonl`` line or a Parquet row is one, taken from the
text field. Inputs are read lazily, in order, so a folder of many GB never has to fit in memory, nor
does one large text file (it comes in pieces); a bad input is one line naming the file (and line)
and the fix.
"""

from __future__ import annotations

import codecs
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
PIECE_CHARS = 4 << 20  # a plain-text file larger than this is read and tokenized in pieces of about this size


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


# Why a file under an input folder was left out: the reasons ``Found.skipped`` counts, with the fix.
NOT_TEXT = "no known extension"
EXCLUDED = "--exclude"
SKIP_FIXES = {NOT_TEXT: "add --glob PATTERN to read such names as plain text"}


@dataclass
class Found:
    """The files to read, and those under the input folders that were left out, by reason."""

    files: list[Path]
    skipped: dict[str, list[Path]]


def skip_report(skipped_files: dict[str, dict]) -> str | None:
    """One line for what a dataset's ``skipped_files`` left out: counts by reason, the first names, the fix."""
    parts = [f"{entry['count']} with {reason} (e.g. {', '.join(Path(p).name for p in entry['first'])}; "
             f"{SKIP_FIXES[reason]})" if reason == NOT_TEXT else
             f"{entry['count']} by {reason} (e.g. {', '.join(Path(p).name for p in entry['first'])})"
             for reason, entry in skipped_files.items()]
    total = sum(entry["count"] for entry in skipped_files.values())
    return f"left out {total} file(s) under the input folders: {'; '.join(parts)}" if parts else None


def discover(inputs: list[str], options: SourceOptions) -> Found:
    """The files to read, in a stable order: each named file, and the wanted files under each folder;
    with those that were not wanted or were excluded."""
    files: list[Path] = []
    skipped: dict[str, list[Path]] = {NOT_TEXT: [], EXCLUDED: []}
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
                if not _wanted(candidate, options):
                    skipped[NOT_TEXT].append(candidate)
                elif _excluded(candidate, options):
                    skipped[EXCLUDED].append(candidate)
                else:
                    files.append(candidate)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {raw}: no such file or folder; pass text, .jsonl or .parquet files or folders")
    if not files:
        raise UserError(f"inputs {' '.join(inputs)}: no files to read (plain text: {', '.join(TEXT_SUFFIXES)}, "
                        ".jsonl, .parquet); add --glob PATTERN for other plain-text names")
    return Found(files, skipped)


@dataclass(frozen=True)
class Piece:
    """A document, or a piece of one: a plain-text file larger than ``PIECE_CHARS`` comes in pieces, cut
    where the tokenizer would start a new token anyway, so their tokens are exactly the whole file's."""

    text: str
    ends_document: bool = True


def safe_cut(text: str, limit: int) -> int:
    """Where ``text`` may be cut at or before ``limit`` without changing its byte-level BPE tokens: at
    a line start after a lone newline (a non-space, a newline, a non-space), else before a lone space
    between two non-spaces. The pre-tokenizer starts a token there whatever follows, and ends the
    one before it the same at the end of a piece (a longer run of white space would not: its last
    character goes with the next word only when one follows). ``limit`` if there is neither (a line
    of ``limit`` characters without a space: only a byte tokenizer reads such text in pieces exactly)."""
    newline = text.rfind("\n", 0, limit)
    while newline > 0:
        if not text[newline - 1].isspace() and newline + 1 < len(text) and not text[newline + 1].isspace():
            return newline + 1
        newline = text.rfind("\n", 0, newline)
    space = text.rfind(" ", 0, limit)
    while space > 0:
        if not text[space - 1].isspace() and space + 1 < len(text) and not text[space + 1].isspace():
            return space
        space = text.rfind(" ", 0, space)
    return limit


class DocumentReader:
    """Yields the documents of the files in order, a large plain-text file in pieces when
    ``in_pieces`` (the tokenizer's tokens do not change at ``safe_cut``); counts what
    ``non_utf8=skip`` left out."""

    def __init__(self, options: SourceOptions, in_pieces: bool = True) -> None:
        self.options = options
        self.in_pieces = in_pieces
        self.skipped = 0

    def documents(self, files: list[Path]) -> Iterator[str]:
        """The texts, pieces of a large file among them (what training a tokenizer needs)."""
        return (piece.text for piece in self.pieces(files))

    def pieces(self, files: list[Path]) -> Iterator[Piece]:
        for path in files:
            if path.suffix in JSONL_SUFFIXES:
                yield from map(Piece, self._jsonl(path))
            elif path.suffix in PARQUET_SUFFIXES:
                yield from map(Piece, self._parquet(path))
            elif self.in_pieces and path.stat().st_size > PIECE_CHARS:
                yield from self._text_pieces(path)
            else:
                text = self._decode(path.read_bytes(), str(path))
                if text is not None:
                    yield Piece(text)

    def _text_pieces(self, path: Path) -> Iterator[Piece]:
        """A large plain-text file, read a block at a time: memory stays at a few pieces."""
        if self.options.non_utf8 is NonUtf8.SKIP and not self._is_utf8(path):
            self.skipped += 1
            return
        decoder, buffer, offset = codecs.getincrementaldecoder("utf-8")(), "", 0
        with path.open("rb") as file:
            while block := file.read(PIECE_CHARS):
                try:
                    buffer += decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise UserError(f"{path}: not UTF-8 (byte {offset + exc.start}); convert it, or pass --non-utf8 "
                                    "skip to leave such inputs out") from None
                offset += len(block)
                while len(buffer) > PIECE_CHARS:
                    cut = safe_cut(buffer, PIECE_CHARS)
                    yield Piece(buffer[:cut], ends_document=False)
                    buffer = buffer[cut:]
        yield Piece(buffer + decoder.decode(b"", final=True))

    @staticmethod
    def _is_utf8(path: Path) -> bool:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with path.open("rb") as file:
                while block := file.read(PIECE_CHARS):
                    decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True

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
