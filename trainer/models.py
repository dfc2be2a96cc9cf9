"""The two trainable models and the hook that tells FSDP2 where to shard.

``ToyModel`` is the seed's model (FQNs ``net1``/``net2``); ``TransformerLM`` is
a small decoder-only LM whose size comes from flags, so checkpoints can range
from kilobytes to gigabytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import TrainConfig

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


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model)
        # No qkv bias: the key bias provably gets a zero gradient (softmax ignores it), and Adam would
        # turn its round-off into lr-sized noise that differs with the reduction order.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.ffn_mult) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)


def build_model(cfg: TrainConfig) -> nn.Module:
    """Build the unwrapped model, initialised from ``cfg.seed`` identically on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ToyModel() if cfg.model == "toy" else TransformerLM(cfg)


def per_sample_loss(model_kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of each sample (shape ``[batch]``), so ranks can weight by sample count."""
    if model_kind == "toy":
        return F.mse_loss(output, target, reduction="none").mean(dim=1)
    tokens = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none")
    return tokens.view(target.shape).mean(dim=1)
