"""The built-in transformer as Hugging Face ``LlamaForCausalLM``: the weight names (a prefix, since
``TransformerLM``'s module names are Llama's), the ``config.json`` of the same architecture, and
reading a safetensors folder back for ``--init-from``. safetensors is a flat tensor format: reading
it runs no code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.models.transformer import NORM_EPS, ROPE_THETA, swiglu_hidden

HF_PREFIX = "model."
UNPREFIXED = ("lm_head.",)


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


def is_hf_folder(path: str) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("*.safetensors"))


def read_hf_weights(path: str, rename: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, in fp32, under this project's names (``rename``) or as
    saved."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--init-from {file}: not a readable safetensors file ({exc})") from None
        state.update({from_hf_name(name) if rename else name: tensor.float() for name, tensor in tensors.items()})
    return state
