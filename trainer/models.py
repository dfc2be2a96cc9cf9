"""The built-in models and the hook that tells FSDP2 where to shard.

``ToyModel`` is the seed's model (FQNs ``net1``/``net2``). ``TransformerLM`` is a Llama-style
decoder (RMSNorm, rotary position embeddings, a SwiGLU MLP, no biases) whose module names are
Hugging Face ``LlamaForCausalLM``'s, so its weights map onto that model one to one; its size comes
from flags or a ``--preset``, so checkpoints range from kilobytes to gigabytes.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.plugins import build_plugin

TOY_IN, TOY_HIDDEN, TOY_OUT = 16, 16, 8


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(TOY_IN, TOY_HIDDEN)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(TOY_HIDDEN, TOY_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))

    def shard_units(self) -> list[nn.Module]:
        return [self.net1, self.net2]


ROPE_THETA = 10_000.0
NORM_EPS = 1e-5


def swiglu_hidden(d_model: int, ffn_mult: int) -> int:
    """Llama's rule: 2/3 of ``ffn_mult * d_model`` (the gate makes three matrices, not two), rounded
    up to a multiple of 8."""
    return -(-2 * ffn_mult * d_model // 3 // 8) * 8


def rotary(seq_len: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotation angles, ``[seq, head_dim]`` (halves repeated)."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (proj(x).view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(attn.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm: attention, then the MLP, each added to the residual stream."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.self_attn = Attention(d_model, n_heads)
        self.post_attention_layernorm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.mlp = SwiGLU(d_model, swiglu_hidden(d_model, ffn_mult))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_heads
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_mult) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=NORM_EPS)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(tokens.shape[1], self.head_dim, tokens.device)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)


def build_model(cfg: TrainConfig) -> nn.Module:
    """Build the unwrapped model, initialised from ``cfg.seed`` identically on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model == "toy":
            return ToyModel()
        if cfg.model == "transformer":
            return TransformerLM(cfg)
        return build_plugin(cfg.model, cfg.model_args, cfg.python_path)


def shard_units(model: nn.Module, pattern: str | None, spec: str) -> list[nn.Module]:
    """What FSDP2 shards below the root, innermost first: ``model.shard_units()`` when it exists,
    else the modules whose FQNs match ``pattern``, else the entries of its ``ModuleList`` children."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    if pattern:
        named = [(name, module) for name, module in model.named_modules() if name]
        units = [module for name, module in reversed(named) if fnmatch.fnmatchcase(name, pattern)]
        if not units:
            names = ", ".join(name for name, _ in named[:6])
            raise UserError(f"--shard-modules {pattern}: matches no module of --model {spec} (its modules "
                            f"start {names}); pass a glob over those names")
        return units
    return [entry for child in model.children() if isinstance(child, nn.ModuleList) for entry in child]


def per_sample_loss(model_kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of each sample (shape ``[batch]``), so ranks can weight by sample count."""
    output = output.float()  # a bf16 forward still takes its loss in fp32
    if model_kind == "toy":
        return F.mse_loss(output, target, reduction="none").mean(dim=1)
    tokens = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none")
    return tokens.view(target.shape).mean(dim=1)


def recompute_activations(unit: nn.Module) -> None:
    """Activation checkpointing that keeps the module's FQNs (so checkpoints load with it on or off):
    its forward runs under ``torch.utils.checkpoint`` and is run again in the backward pass."""
    forward = unit.forward

    def recomputed(*args: object, **kwargs: object) -> object:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = recomputed  # type: ignore[method-assign]
