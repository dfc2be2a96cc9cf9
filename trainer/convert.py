"""DCP <-> torch.save conversion, wrapping ``torch.distributed.checkpoint.format_utils``."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from trainer.errors import UserError


def dcp_to_torch(checkpoint: str, out: str) -> None:
    """One ``.pth`` holding the whole (unsharded) state; loads with ``weights_only=True``."""
    if not (Path(checkpoint) / ".metadata").is_file():
        raise UserError(f"{checkpoint}: not a DCP checkpoint (no .metadata); pick one from 'fsdp-train ckpt list'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(checkpoint, out)


def torch_to_dcp(source: str, out_dir: str) -> None:
    if not Path(source).is_file():
        raise UserError(f"{source}: no such file; pass a .pth written by torch.save")
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; pass a new directory")
    try:
        torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise UserError(f"{source}: not a loadable torch.save file ({type(exc).__name__})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch_save_to_dcp(source, out_dir)
