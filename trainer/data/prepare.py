"""``fsdp-train prepare-data``: local files -> a token dataset (``train.bin``, ``val.bin``, ``dataset.json``).

The ``.bin`` files are flat token ids, each document followed by the end-of-document id, read
later through ``numpy.memmap``. Whole documents are held out for validation, evenly spread
through the inputs. Documents are tokenized by a pool of processes a bounded number of chunks
ahead, and everything is written into a scratch folder renamed into place at the end, so a
failed run leaves nothing behind and memory stays flat on inputs of any size.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trainer.data.dataset import DATASET_FILE, FORMAT_VERSION, SPLITS, token_dtype
from trainer.data.sources import DocumentReader, Found, Piece, SourceOptions, discover
from trainer.data.tokenizer import BYTES, TOKENIZER_FILE, Tokenizer, open_tokenizer, train_bpe
from trainer.errors import UserError

CHUNK_CHARS = 4 << 20  # text per tokenizer task
CHUNKS_AHEAD_PER_WORKER = 2


@dataclass(frozen=True)
class PrepareOptions:
    inputs: list[str]
    out: Path
    tokenizer: str = BYTES  # the byte tokenizer, or the path of a tokenizer.json
    train_tokenizer: int | None = None  # vocabulary size of a BPE to train on the inputs
    val_fraction: float = 0.01
    workers: int = 0  # 0: one per CPU, at most 8
    sources: SourceOptions = SourceOptions()


def is_val_document(index: int, fraction: float) -> bool:
    """Every 1/fraction-th document, the first halfway into the first period: evenly spread, streamed."""
    return math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)


class SplitWriter:
    """Appends token arrays to one ``.bin`` file, hashing and counting as it goes."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.file = path.open("wb")
        self.dtype = dtype
        self.sha256 = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def append(self, tokens: np.ndarray, eos_id: int | None) -> None:
        """A document's tokens, or a piece's: ``eos_id`` None means the document goes on."""
        ending = [] if eos_id is None else [eos_id]
        data = np.append(tokens.astype(self.dtype, copy=False), np.asarray(ending, dtype=self.dtype)).tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.tokens += len(tokens) + len(ending)
        self.documents += len(ending)

    def close(self) -> None:
        self.file.close()


_worker_tokenizer: Tokenizer | None = None


def _init_worker(name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = open_tokenizer(name)


def _encode(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def _chunks(pieces: Iterator[Piece], progress: tqdm) -> Iterator[list[Piece]]:
    chunk: list[Piece] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece.text)
        if size >= CHUNK_CHARS:
            progress.update(size)
            yield chunk
            chunk, size = [], 0
    if chunk:
        progress.update(size)
        yield chunk


def _encoded(chunks: Iterator[list[Piece]], tokenizer_name: str, workers: int) -> Iterator[tuple[Piece, np.ndarray]]:
    """Each piece with its tokens, in order, with at most a few chunks in flight. The byte tokenizer
    is a memory copy: shipping text to other processes would cost more than it saves."""
    if tokenizer_name == BYTES or workers == 1:
        _init_worker(tokenizer_name)
        for chunk in chunks:
            yield from zip(chunk, _encode([piece.text for piece in chunk]))
        return
    context = multiprocessing.get_context("spawn")  # no forked copy of a parent's threads or big state
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_name,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode, ([piece.text for piece in chunk],))))
            if len(pending) >= workers * CHUNKS_AHEAD_PER_WORKER:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())


def prepare(options: PrepareOptions) -> dict[str, Any]:
    """Write the dataset into ``options.out``; returns its ``dataset.json`` content."""
    if not 0 <= options.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1) (got {options.val_fraction})")
    out = options.out
    if (out / DATASET_FILE).exists() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out}: already holds a dataset (or is a file); remove it or pick another folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty; pick a new or empty folder")
    found = discover(options.inputs, options.sources)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        manifest = _write(options, found, scratch)
        if out.is_dir():
            out.rmdir()
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _write(options: PrepareOptions, found: Found, scratch: Path) -> dict[str, Any]:
    started, files = time.perf_counter(), found.files
    tokenizer_name = options.tokenizer
    if options.train_tokenizer is not None:
        texts = DocumentReader(options.sources).documents(files)  # a large file's pieces train it as well
        tokenizer = train_bpe(texts, options.train_tokenizer, scratch / TOKENIZER_FILE)
        tokenizer_name = str(scratch / TOKENIZER_FILE)
    else:
        tokenizer = open_tokenizer(tokenizer_name)
        if tokenizer_name != BYTES:
            shutil.copyfile(tokenizer_name, scratch / TOKENIZER_FILE)
    reader = DocumentReader(options.sources, in_pieces=tokenizer.reads_in_pieces())
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: SplitWriter(scratch / f"{split}.bin", dtype) for split in SPLITS}
    workers = options.workers or min(8, os.cpu_count() or 1)
    total_bytes = sum(path.stat().st_size for path in files)
    index = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare-data", dynamic_ncols=True) as progress:
        for piece, tokens in _encoded(_chunks(reader.pieces(files), progress), tokenizer_name, workers):
            split = "val" if is_val_document(index, options.val_fraction) else "train"
            writers[split].append(tokens, tokenizer.eos_id if piece.ends_document else None)
            index += piece.ends_document
    for writer in writers.values():
        writer.close()
    if writers["train"].documents == 0:
        raise UserError(f"inputs {' '.join(options.inputs)}: no documents to train on (all empty or skipped)")
    manifest = {
        "format_version": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "tokenizer": tokenizer.spec(),
        "tokens": {split: w.tokens for split, w in writers.items()},
        "documents": {split: w.documents for split, w in writers.items()},
        "skipped_non_utf8": reader.skipped,
        "skipped_files": {reason: {"count": len(paths), "first": [str(path) for path in paths[:3]]}
                          for reason, paths in found.skipped.items() if paths},
        "sources": [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in files],
        "sha256": {f"{split}.bin": w.sha256.hexdigest() for split, w in writers.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (scratch / DATASET_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
