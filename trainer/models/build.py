"""Which model a config names, built the same on every rank; reading its output as logits; the
loss it trains with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import TrainConfig, is_hf
from trainer.errors import UserError
from trainer.models.hf import build_hf
from trainer.models.plugins import build_plugin
from trainer.models.toy import ToyModel
from trainer.models.transformer import TransformerLM

# A model small enough to run for real in the preflight when it cannot run on the meta device
# (Hugging Face models call .item() while building their attention mask): 64M parameters, 256 MB.
PROBE_ON_CPU_PARAMETERS = 1 << 26


def build_model(cfg: TrainConfig) -> nn.Module:
    """Build the unwrapped model, initialised from ``cfg.seed`` identically on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model == "toy":
            return ToyModel()
        if cfg.model == "transformer":
            return TransformerLM(cfg)
        if is_hf(cfg.model):
            return build_hf(cfg.model)
        return build_plugin(cfg.model, cfg.model_args, cfg.python_path)


def logits_of(output: Any, spec: str) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (a ``transformers``
    ``ModelOutput``), a mapping's ``"logits"``, or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, Sequence) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise UserError(f"--model {spec}: its forward returned {type(output).__name__}, which holds no logits; "
                        "return a tensor, an object with .logits, or a tuple whose first element is the logits")
    return logits


def check_output(model: nn.Module, cfg: TrainConfig) -> None:
    """Run a forward on a tiny batch and check that its output reads as ``[batch, seq, vocab]``
    logits wide enough for the data's ids: on the meta device (no memory, no compute), or on the
    CPU for a model small enough when the meta device cannot run it. A larger model that cannot
    run on meta is checked by the workers' first step instead."""
    if cfg.model == "toy":
        return
    tokens = torch.zeros(1, min(cfg.seq_len, 8), dtype=torch.long)
    try:
        output = model(tokens.to("meta"))
    except (RuntimeError, NotImplementedError):
        if sum(p.numel() for p in model.parameters()) > PROBE_ON_CPU_PARAMETERS:
            return
        try:
            output = model.to_empty(device="cpu")(tokens)
        except Exception as exc:  # noqa: BLE001 - the user's model: any error is theirs, in one line
            raise UserError(f"--model {cfg.model}: a forward on a [1, {tokens.shape[1]}] batch of token ids raised "
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
                            "it must map [batch, seq] token ids to logits") from None
    logits = logits_of(output, cfg.model)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise UserError(f"--model {cfg.model}: its logits have shape {list(logits.shape)} for a [1, {tokens.shape[1]}] "
                        "batch; they must be [batch, seq, vocab]")
    if logits.shape[-1] < cfg.vocab_size:
        raise UserError(f"--model {cfg.model}: it has {logits.shape[-1]} logits per token, but the data's ids go "
                        f"up to {cfg.vocab_size - 1} (vocabulary {cfg.vocab_size}); build the model with a "
                        f"vocabulary of at least {cfg.vocab_size}")


def per_sample_loss(model_kind: str, output: Any, target: torch.Tensor) -> torch.Tensor:
    """Loss of each sample (shape ``[batch]``), so ranks can weight by sample count."""
    output = logits_of(output, model_kind).float()  # a bf16 forward still takes its loss in fp32
    if model_kind == "toy":
        return F.mse_loss(output, target, reduction="none").mean(dim=1)
    tokens = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none")
    return tokens.view(target.shape).mean(dim=1)
