"""prepare-data and the token dataset: every input kind, the bad inputs, and a sample order that
needs no loader state (a bijection per epoch, addressed by global sample index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import error_lines, run_cli
from trainer.config import TrainConfig
from trainer.data.dataset import DATASET_FILE, TokenWindows, WindowOrder, open_dataset
from trainer.data.loader import TrainingData, rank_slice
from trainer.data.prepare import PrepareOptions, is_val_document, prepare
from trainer.data.sources import NonUtf8, SourceOptions
from trainer.data.tokenizer import ByteTokenizer, dataset_tokenizer
from trainer.errors import UserError

DOCS = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]


def write_texts(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.py").write_text(doc)
    return folder


def prepared(tmp_path: Path, docs: list[str] = DOCS, **options) -> Path:
    out = tmp_path / "dataset"
    prepare(PrepareOptions([str(write_texts(tmp_path / "src", docs))], out, **options))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 1000, 4097])
def test_the_window_order_is_a_bijection_and_each_epoch_has_its_own(n):
    orders = [[WindowOrder(n, seed=7, epoch=e)[i] for i in range(n)] for e in (0, 1)]
    assert sorted(orders[0]) == list(range(n)) and sorted(orders[1]) == list(range(n))
    if n >= 16:
        assert orders[0] != orders[1], "a new epoch must visit the windows in a new order"
        assert orders[0] != list(range(n)), "not shuffled"
    assert orders[0] == [WindowOrder(n, seed=7, epoch=0)[i] for i in range(n)], "same key, same order"


def test_text_files_become_documents_with_whole_ones_held_out(tmp_path):
    out = prepared(tmp_path, val_fraction=0.1)
    manifest = json.loads((out / DATASET_FILE).read_text())
    assert manifest["documents"] == {"train": 36, "val": 4}
    assert (manifest["dtype"], manifest["vocab_size"], manifest["eos_id"]) == ("uint16", 257, 256)
    val_docs = [doc for i, doc in enumerate(DOCS) if is_val_document(i, 0.1)]
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    expected = np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8), 256) for d in val_docs])
    assert np.array_equal(val, expected), "held-out documents are whole and end with end-of-document"
    info = open_dataset(out)
    assert info.tokens["train"] + info.tokens["val"] == sum(len(d) + 1 for d in DOCS)
    assert len(manifest["sources"]) == 40 and manifest["sources"][0]["bytes"] == len(DOCS[0])
    import hashlib

    assert manifest["sha256"]["train.bin"] == hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()


def test_jsonl_and_parquet_documents_come_from_the_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS[:5])) + "\n\n")
    pq.write_table(pa.table({"body": DOCS[5:9], "n": list(range(4))}), src / "b.parquet")
    out = tmp_path / "out"
    manifest = prepare(PrepareOptions([str(src)], out, val_fraction=0.0, sources=SourceOptions(text_field="body")))
    assert manifest["documents"] == {"train": 9, "val": 0}
    text = ByteTokenizer().decode(np.fromfile(out / "train.bin", dtype=np.uint16).tolist())
    assert text == "".join(DOCS[:9])


def test_a_trained_bpe_tokenizer_is_saved_and_decodes_the_data(tmp_path):
    out = prepared(tmp_path, docs=DOCS * 5, train_tokenizer=300, val_fraction=0.0)
    info = open_dataset(out)
    tokenizer = dataset_tokenizer(out, info.tokenizer)
    assert (out / "tokenizer.json").is_file() and 258 <= info.vocab_size <= 300
    ids = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert len(ids) < sum(len(d) for d in DOCS * 5), "merges make fewer tokens than bytes"
    first_doc = ids[: int(np.argmax(ids == info.eos_id))].tolist()
    assert tokenizer.decode(first_doc) == DOCS[0]


def test_any_world_size_draws_the_same_samples_across_an_epoch_boundary(tmp_path):
    info = open_dataset(prepared(tmp_path))
    windows = TokenWindows(info, "train", seq_len=16, seed=3, shuffle=True)
    assert windows.windows > 10
    batch, first = 12, windows.windows - 5  # this global batch straddles epochs 0 and 1
    whole = windows.batch(first, batch)
    for world in (2, 3, 5):
        parts = [windows.batch(first + a, b - a) for a, b in (rank_slice(batch, world, r) for r in range(world))]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    inputs, targets = whole
    assert torch.equal(inputs[:, 1:], targets[:, :-1]), "targets are the inputs shifted by one token"
    epoch1 = {windows.window(windows.windows + j) for j in range(windows.windows)}
    assert epoch1 == set(range(windows.windows)), "epoch 1 visits every window once"


def bad(fn) -> str:
    with pytest.raises(UserError) as caught:
        fn()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "src"
    src.mkdir()

    def run(*inputs: str, **options):
        return bad(lambda: prepare(PrepareOptions([str(p) for p in inputs], out, **options)))

    assert "no such file or folder" in run(tmp_path / "missing")
    assert "no files to read" in run(src)
    (src / "a.jsonl").write_text('{"text": "ok"}\n{not json\n')
    assert f"{src / 'a.jsonl'}:2: not JSON" in run(src / "a.jsonl")
    (src / "a.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert "a.jsonl:2: no text field 'text'; pass --text-field" in run(src / "a.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), src / "b.parquet")
    assert "no column 'text' (columns: body)" in run(src / "b.parquet")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "latin1.txt: not UTF-8 (byte 3); convert it, or pass --non-utf8 skip" in run(src / "latin1.txt")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*")), "a failed run leaves nothing behind"
    (src / "good.txt").write_text("hello")
    manifest = prepare(PrepareOptions([str(src / "latin1.txt"), str(src / "good.txt")], out, val_fraction=0.0,
                                      sources=SourceOptions(non_utf8=NonUtf8.SKIP)))
    assert manifest["skipped_non_utf8"] == 1 and manifest["documents"]["train"] == 1
    assert "already holds a dataset" in run(src / "good.txt")


def test_the_cli_prepares_a_dataset_and_names_a_bad_one(tmp_path):
    src = write_texts(tmp_path / "src", DOCS)
    for index in range(17):  # files a folder holds that are not text by their name: left out, and said so
        (src / f"NOTES{index}").write_text("not read")
    (src / "draft.txt").write_text("excluded")
    proc = run_cli("prepare-data", str(src), "--out", str(tmp_path / "ds"), "--exclude", "*draft*", "--val-fraction",
                   "0.1", check=True)
    assert "training and" in proc.stdout and "from 40 documents (uint16, vocabulary 257)" in proc.stdout
    assert ("prepare-data: warning: left out 18 file(s) under the input folders: 17 with no known extension "
            "(e.g. NOTES0, NOTES1, NOTES10; add --glob PATTERN") in proc.stderr and "1 by --exclude" in proc.stderr
    skipped = json.loads((tmp_path / "ds" / DATASET_FILE).read_text())["skipped_files"]
    assert {reason: entry["count"] for reason, entry in skipped.items()} == {"no known extension": 17,
                                                                            "--exclude": 1}
    assert "no held-out tokens" not in proc.stderr
    proc = run_cli("prepare-data", str(src), "--out", str(tmp_path / "no-val"), "--val-fraction", "0", check=True)
    assert "warning: no held-out tokens (--val-fraction 0 over 41 documents)" in proc.stderr  # draft.txt too
    again = run_cli("prepare-data", str(src), "--out", str(tmp_path / "ds"), "--skip-if-prepared", check=True)
    assert "already holds a complete dataset" in again.stdout, "a prepared dataset is not prepared again"
    assert "already holds a dataset" in run_cli("prepare-data", str(src), "--out", str(tmp_path / "ds")).stderr
    proc = run_cli("prepare-data", str(tmp_path / "nope"), "--out", str(tmp_path / "ds2"))
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1 and "no such file or folder" in proc.stderr


def test_training_data_refuses_what_cannot_train(tmp_path):
    out = prepared(tmp_path)
    lm = {"model": "transformer", "vocab_size": 257, "seq_len": 16, "data": str(out)}
    assert TrainingData(TrainConfig(**lm)).windows > 0
    assert "vocabulary (257 ids) is larger than the model's --vocab-size 256" in bad(
        lambda: TrainingData(TrainConfig(**{**lm, "vocab_size": 256})))
    assert "fewer than one global batch (4096)" in bad(
        lambda: TrainingData(TrainConfig(**lm, global_batch_size=4096)))
    assert "the toy model takes no token data" in bad(lambda: TrainingData(TrainConfig(data=str(out))))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no dataset.json (an empty or unprepared folder)" in bad(
        lambda: TrainingData(TrainConfig(**{**lm, "data": str(empty)})))
    manifest = json.loads((out / DATASET_FILE).read_text())
    (out / DATASET_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    assert "format version 99, this fsdp-train reads 1" in bad(lambda: TrainingData(TrainConfig(**lm)))
    (out / DATASET_FILE).write_text(json.dumps(manifest))
    (out / "train.bin").write_bytes(b"\0\0")
    assert "train.bin is missing or not" in bad(lambda: TrainingData(TrainConfig(**lm)))


def test_micro_batch_size_zero_is_refused_in_one_line():
    proc = run_cli("train", "--micro-batch-size", "0")
    assert proc.returncode == 2 and "--micro-batch-size must be >= 1 (got 0)" in proc.stderr


def large_text(chars: int) -> str:
    """Code-like text with long lines, runs of spaces and blank lines, digits and multi-byte characters."""
    lines, index, size = [], 0, 0
    while size < chars:
        index += 1
        lines.append(f"def f{index}(x):  # héllo wörld € {index * 7919}\n    return x * {index}   \n\n"
                     + "word " * (index % 40) + "\n")
        size += len(lines[-1])
    return "".join(lines)


def test_a_large_text_file_is_read_in_pieces_with_the_tokens_of_the_whole(tmp_path, monkeypatch):
    from trainer.data import sources
    from trainer.data.tokenizer import FileTokenizer

    monkeypatch.setattr(sources, "PIECE_CHARS", 4096)
    text = large_text(6 * 4096)
    (tmp_path / "src").mkdir()
    big = tmp_path / "src" / "big.txt"
    big.write_text(text)
    pieces = list(sources.DocumentReader(SourceOptions()).pieces([big]))
    assert len(pieces) >= 6 and [p.ends_document for p in pieces].count(True) == 1
    assert "".join(p.text for p in pieces) == text
    for name, options in (("bytes", {}), ("bpe", {"train_tokenizer": 400})):
        out = tmp_path / name
        manifest = prepare(PrepareOptions([str(big)], out, val_fraction=0.0, workers=1, **options))
        info = open_dataset(out)
        tokenizer = ByteTokenizer() if name == "bytes" else FileTokenizer(out / "tokenizer.json")
        assert name == "bytes" or tokenizer.reads_in_pieces(), "our BPE is byte-level with no prefix: pieces are exact"
        expected = np.append(tokenizer.encode_batch([text])[0], info.eos_id)
        written = np.fromfile(out / "train.bin", dtype=info.dtype)
        assert np.array_equal(written, expected), f"{name}: the pieces' tokens differ from the whole file's"
        assert manifest["documents"]["train"] == 1


def test_preparing_a_large_text_file_keeps_memory_flat(tmp_path):
    import tracemalloc

    from trainer.data.sources import PIECE_CHARS

    peaks = {}
    for pieces in (4, 16):  # read whole, 12 more pieces would add about 12 x 4 MiB x 4 (bytes, text, tokens)
        source = tmp_path / f"{pieces}.txt"
        source.write_text(large_text(pieces * PIECE_CHARS))
        tracemalloc.start()
        try:
            prepare(PrepareOptions([str(source)], tmp_path / f"{pieces}-out", val_fraction=0.0, workers=1))
            peaks[pieces] = tracemalloc.get_traced_memory()[1] >> 20  # Python and numpy allocations, MB
        finally:
            tracemalloc.stop()
    print(f"\nprepare-data peak memory: {peaks[4]} MB for a file of 4 pieces, {peaks[16]} MB for 16")
    assert peaks[16] - peaks[4] < PIECE_CHARS >> 20, peaks
