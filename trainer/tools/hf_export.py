"""``export-hf``: a checkpoint's built-in transformer as a ``LlamaForCausalLM`` folder (safetensors,
``config.json``, the dataset's tokenizer) that ``transformers`` loads with ``from_pretrained``.

Weights are written by DCP's ``HuggingFaceStorageWriter`` (one process, no process group), a file
per ``--max-shard-bytes`` with ``model.safetensors.index.json`` when there are several; the names
and the config come from ``models.hf_llama``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

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

    from trainer.data.dataset import open_dataset
    from trainer.tools.inference import load_model

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
