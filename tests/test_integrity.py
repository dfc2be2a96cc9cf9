"""Block checksums: recorded while writing, shared out evenly across ranks at load, damage named."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import xxhash

from trainer.checkpoint import integrity
from trainer.checkpoint.integrity import BLOCKS, BlockDigests, Span


def _entry(data: bytes, block_bytes: int) -> dict:
    digests = BlockDigests(block_bytes)
    digests.update(memoryview(data))
    return digests.entry()


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 30, 57])
def test_block_digests_match_each_block_whatever_the_write_sizes(size: int) -> None:
    data = random.Random(size).randbytes(size)
    digests = BlockDigests(block_bytes=10)
    rng, at = random.Random(1), 0
    while at < size:  # pieces that start and end anywhere, some spanning several blocks
        piece = rng.randint(1, 25)
        digests.update(memoryview(data)[at:at + piece])
        at += piece
    expected = [xxhash.xxh3_64(data[start:start + 10]).hexdigest() for start in range(0, size, 10)] \
        or [xxhash.xxh3_64(b"").hexdigest()]
    assert digests.entry() == {"bytes": size, "block_bytes": 10, BLOCKS: expected}


def test_file_digest_reads_back_what_was_recorded_while_writing(tmp_path: Path) -> None:
    data = random.Random(0).randbytes(3 * integrity.CHUNK + 5)
    (tmp_path / "shard").write_bytes(data)
    assert integrity.file_digest(tmp_path / "shard") == _entry(data, integrity.BLOCK_BYTES)


def _spans(lengths: list[int]) -> list[Span]:
    return [Span(f"f{index}", 0, length, "", True) for index, length in enumerate(lengths)]


@pytest.mark.parametrize("lengths", [[64] * 24, [640, 640, 3], [5, 1000, 7, 7, 300], [0, 0], [10]])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_every_span_is_checked_by_exactly_one_rank_and_the_bytes_are_shared_evenly(lengths, world_size) -> None:
    spans = _spans(lengths)
    shares = [integrity.share(spans, rank, world_size) for rank in range(world_size)]
    assert sorted(span.name for share in shares for span in share) == sorted(span.name for span in spans)
    fair = sum(lengths) / world_size + max(lengths)
    assert max(sum(span.length for span in share) for share in shares) <= fair


def test_two_files_verified_by_three_ranks_leave_no_rank_idle(tmp_path: Path) -> None:
    # What a 2 -> 3 resume sees: with one checksum per file, one rank would have nothing to read.
    recorded = {}
    for name in ("__0_0.distcp", "__1_0.distcp"):
        data = random.Random(name).randbytes(12 * 100)
        (tmp_path / name).write_bytes(data)
        recorded[name] = _entry(data, block_bytes=100)
    per_rank = [sum(span.length for span in integrity.share(integrity.spans(recorded), rank, 3)) for rank in range(3)]
    assert per_rank == [800, 800, 800]
    assert all(integrity.problems(tmp_path, recorded, rank, 3) == [] for rank in range(3))


def test_an_altered_block_is_found_by_the_rank_that_owns_it_and_named(tmp_path: Path) -> None:
    data = bytearray(random.Random(0).randbytes(1000))
    recorded = {"shard": _entry(bytes(data), block_bytes=100)}
    data[555] ^= 0xFF
    (tmp_path / "shard").write_bytes(data)
    found = {rank: integrity.problems(tmp_path, recorded, rank, 4) for rank in range(4)}
    message = f"{tmp_path / 'shard'}: checksum of bytes 500-600 differs from the one recorded at commit (altered)"
    assert sorted(problem for problems in found.values() for problem in problems) == [message]
    assert integrity.problems(tmp_path, recorded) == [message]


def test_sizes_are_checked_by_every_rank_and_a_short_file_is_reported_once(tmp_path: Path) -> None:
    data = random.Random(0).randbytes(1000)
    recorded = {"shard": _entry(data, block_bytes=100), "gone": _entry(b"x", block_bytes=100)}
    (tmp_path / "shard").write_bytes(data[:640])
    for rank in range(3):
        assert integrity.problems(tmp_path, recorded, rank, 3) == [
            f"{tmp_path / 'gone'}: missing",
            f"{tmp_path / 'shard'}: 640 bytes, 1000 recorded at commit (truncated or rewritten)"]


def test_markers_with_one_checksum_per_file_still_verify(tmp_path: Path) -> None:
    data = bytearray(random.Random(0).randbytes(500))
    recorded = {"shard": {"bytes": len(data), "xxh3_64": xxhash.xxh3_64(bytes(data)).hexdigest()}}
    (tmp_path / "shard").write_bytes(data)
    assert integrity.problems(tmp_path, recorded) == []
    data[7] ^= 1
    (tmp_path / "shard").write_bytes(data)
    assert integrity.problems(tmp_path, recorded) == [
        f"{tmp_path / 'shard'}: checksum differs from the one recorded at commit (altered)"]
