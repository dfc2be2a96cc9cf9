"""Hugging Face interop: ``export-hf`` writes a checkpoint's built-in transformer as a
``LlamaForCausalLM`` folder (safetensors, ``config.json``, the dataset's tokenizer), and
``--init-from`` reads such a folder back.

The module names of ``models.TransformerLM`` are Llama's, so the mapping is a prefix. Weights
are written by DCP's ``HuggingFaceStorageWriter`` (one process, no process group), a file per
``--max-shard-bytes`` with ``model.safetensors.index.json`` when there are several. safetensors
is a flat tensor format: reading it runs no code.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.models import NORM_EPS, ROPE_THETA, swiglu_hidden

HF_PREFIX = "model."
UNPREFIXED = ("lm_head.",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_hf_name(name: str) -> str:
    return name if name.startswith(UNPREFIXED) else HF_PREFIX + name


def from_hf_name(name: str) -> str:
    return name.removeprefix(HF_PREFIX)


def llama_config(cfg: TrainConfig, dtype: str, eos_id: int | None) -> dict[str, Any]:
    """``config.json`` for ``transformers.LlamaConfig``: the same architecture, field by field."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": swiglu_hidden(cfg.d_model, cfg.ffn_mult),
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads, "max_position_embeddings": cfg.seq_len, "hidden_act": "silu",
        "rms_norm_eps": NORM_EPS, "rope_theta": ROPE_THETA, "rope_scaling": None, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None, "initializer_range": 0.02,
    }


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

    from trainer.inference import load_model
    from trainer.token_data import open_dataset

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{out}: exists and is not empty; pass a new folder")
    model, cfg = load_model(checkpoint)
    if cfg.model != "transformer":
        raise UserError(f"{checkpoint}: export-hf maps the built-in transformer onto Llama; this run trained "
                        f"--model {cfg.model}")
    state = {to_hf_name(name): tensor.to(DTYPES[dtype]).contiguous() for name, tensor in model.state_dict().items()}
    plan = shard_plan(state, max_shard_bytes)
    target.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(target), fqn_to_index_mapping=plan),
                 no_dist=True)
    eos_id = None
    if cfg.data is not None and Path(cfg.data, "dataset.json").is_file():
        info = open_dataset(cfg.data)
        eos_id = info.eos_id
        if info.tokenizer.get("kind") == "file":
            shutil.copyfile(info.directory / info.tokenizer["file"], target / "tokenizer.json")
    (target / "config.json").write_text(json.dumps(llama_config(cfg, dtype, eos_id), indent=2) + "\n")
    return sorted(p.name for p in target.iterdir())


def is_hf_folder(path: str) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("*.safetensors"))


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, under this project's names, in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--init-from {file}: not a readable safetensors file ({exc})") from None
        state.update({from_hf_name(name): tensor.float() for name, tensor in tensors.items()})
    return state
