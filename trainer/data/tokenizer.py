"""Text <-> token ids: the built-in byte tokenizer, or a Hugging Face ``tokenizers`` file.

A dataset records which one made it (``spec()``), so training, ``infer --prompt`` and
``export-hf`` all decode with the same one. A tokenizer file is JSON read by the ``tokenizers``
library (Rust, no code runs from it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trainer.errors import UserError

BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...

    def reads_in_pieces(self) -> bool: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 for end-of-document: nothing to download or train."""

    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": BYTES, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def reads_in_pieces(self) -> bool:
        """Bytes are bytes wherever a text is cut."""
        return True


class FileTokenizer:
    """A Hugging Face ``tokenizer.json``; the end-of-document id is its first known EOS token."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises one generic error type for any bad file
            raise UserError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({exc}); pass such a file, "
                            "or --tokenizer bytes") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next((self._tok.token_to_id(t) for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise UserError(f"--tokenizer {path}: none of its tokens is an end-of-document token "
                            f"({', '.join(EOS_CANDIDATES)}); add one to the tokenizer")
        self.eos_id = eos

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def reads_in_pieces(self) -> bool:
        """Whether a large text cut at ``sources.safe_cut`` tokenizes exactly as the whole: a byte-level
        BPE that adds no prefix to each input and whose normalizer cannot join across a cut (none, or
        NFC). Other tokenizers (a SentencePiece prefix, say) read such a file whole."""
        config = json.loads(self.path.read_text())
        normalizer = config.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            return False
        pre = config.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        byte_level = [part for part in parts if part.get("type") == "ByteLevel"]
        return (bool(byte_level) and all(part.get("type") in ("ByteLevel", "Split", "Digits") for part in parts)
                and not any(part.get("add_prefix_space") for part in byte_level))

    def spec(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"kind": "file", "file": TOKENIZER_FILE, "sha256": digest, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id}


def open_tokenizer(name: str) -> Tokenizer:
    """``bytes`` or the path of a ``tokenizer.json``."""
    if name == BYTES:
        return ByteTokenizer()
    path = Path(name)
    if not path.is_file():
        raise UserError(f"--tokenizer {name}: no such file; pass a Hugging Face tokenizer.json or 'bytes'")
    return FileTokenizer(path)


def train_bpe(texts: Iterator[str], vocab_size: int, out: Path) -> FileTokenizer:
    """Train a byte-level BPE on ``texts`` and save it as ``out`` (a tokenizer.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UserError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs at least 258 ids "
                        "(256 bytes, end-of-document and one merge)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_CANDIDATES[0]], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))
    return FileTokenizer(out)


def dataset_tokenizer(directory: Path, spec: dict[str, Any]) -> Tokenizer:
    """The tokenizer a dataset recorded: the byte tokenizer, or the file kept beside it."""
    if spec.get("kind") == BYTES:
        return ByteTokenizer()
    return FileTokenizer(directory / str(spec.get("file", TOKENIZER_FILE)))
