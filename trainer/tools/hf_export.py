"""``export-hf``: a checkpoint's model as a folder (safetensors, ``config.json``, the dataset's
tokenizer) that ``transformers`` loads with ``from_pretrained``: the built-in transformer as
``LlamaForCausalLM``, an ``hf:`` model as itself.

Weights are written by DCP's ``HuggingFaceStorageWriter`` (one process, no process group), a file
per ``--max-shard-bytes`` with ``model.safetensors.index.json`` when there are several; the names
and the config come from ``models.hf_llama``. A run of an ``hf:`` model is written by the model's
own ``save_pretrained``: its architecture, its config and its names, as it came.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from trainer.config import TrainConfig, is_hf
from trainer.data.tokenizer import TOKENIZER_FILE
from trainer.errors import UserError
from trainer.models.hf_llama import llama_config, to_hf_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, int]:
    """Tensor name -> file index (1-based), filling files in order up to ``max_shard_bytes``."""
    plan, index, used = {}, 1, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if used and used + size > max_shard_bytes:
            index, used = index + 1, 0
        plan[name], used = index, used + size
    return plan


def export_hf(checkpoint: str, out: str, dtype: str = "fp32", max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write the folder; returns the files written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from trainer.tools.inference import load_model

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{out}: exists and is not empty; pass a new folder")
    model, cfg = load_model(checkpoint)
    if is_hf(cfg.model):
        model.to(DTYPES[dtype]).save_pretrained(str(target), safe_serialization=True,
                                                max_shard_size=max_shard_bytes)
        copy_tokenizer(cfg, target)
        return sorted(p.name for p in target.iterdir())
    if cfg.model != "transformer":
        raise UserError(f"{checkpoint}: export-hf writes the built-in transformer (as Llama) and hf: models; "
                        f"this run trained --model {cfg.model}")
    state = {to_hf_name(name): tensor.to(DTYPES[dtype]).contiguous() for name, tensor in model.state_dict().items()}
    plan = shard_plan(state, max_shard_bytes)
    target.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(target), fqn_to_index_mapping=plan),
                 no_dist=True)
    eos_id = copy_tokenizer(cfg, target)
    (target / "config.json").write_text(json.dumps(llama_config(cfg, dtype, eos_id), indent=2) + "\n")
    return sorted(p.name for p in target.iterdir())


def copy_tokenizer(cfg: TrainConfig, target: Path) -> int | None:
    """The run's dataset's tokenizer into ``target`` as ``AutoTokenizer`` reads it (``tokenizer.json``
    and a ``tokenizer_config.json`` naming the end-of-document token); returns that token's id (None:
    synthetic data, no tokenizer)."""
    from tokenizers import Tokenizer

    from trainer.data.dataset import open_dataset

    if cfg.data is None or not Path(cfg.data, "dataset.json").is_file():
        return None
    info = open_dataset(cfg.data)
    if info.tokenizer.get("kind") == "file":
        shutil.copyfile(info.directory / info.tokenizer["file"], target / TOKENIZER_FILE)
        eos_token = Tokenizer.from_file(str(target / TOKENIZER_FILE)).id_to_token(info.eos_id)
    else:
        eos_token = write_byte_tokenizer(target / TOKENIZER_FILE, info.eos_id)
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "model_max_length": cfg.seq_len,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    return info.eos_id


BYTE_EOS_TOKEN = "<|endoftext|>"


def byte_characters() -> list[str]:
    """The printable character that byte-level BPE uses for each byte value (GPT-2's mapping:
    printable Latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def write_byte_tokenizer(path: Path, eos_id: int) -> str:
    """The byte tokenizer as a ``tokenizers`` file: byte ``b`` is id ``b`` (a byte-level BPE with no
    merges), and ``eos_id`` a special token; returns that token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_characters())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_EOS_TOKEN, special=True)])
    if tokenizer.token_to_id(BYTE_EOS_TOKEN) != eos_id:
        raise UserError(f"{path}: the byte tokenizer's end-of-document id is {eos_id}, not 256; re-run prepare-data")
    tokenizer.save(str(path))
    return BYTE_EOS_TOKEN
