"""DCP <-> ``torch.save`` conversion, reading both sides as data.

``dcp-to-torch`` reads the checkpoint through ``reader.read_state`` (restricted metadata, bytes
items with ``weights_only=True``); ``torch-to-dcp`` loads the ``.pth`` with ``weights_only=True``.
DCP's own ``format_utils`` would load with ``weights_only=False`` on both paths.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint.reader import read_state
from trainer.errors import UserError
from trainer.models.init_weights import load_torch_file


def dcp_to_torch(checkpoint: str, out: str) -> None:
    """One ``.pth`` holding the whole (unsharded) state; loads with ``weights_only=True``."""
    state = read_state(checkpoint)
    torch.save(state, out)


def torch_to_dcp(source: str, out_dir: str) -> None:
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; pass a new directory")
    state = load_torch_file(source, source)
    if not isinstance(state, dict):
        raise UserError(f"{source}: holds a {type(state).__name__}, not a state dict; pass a torch.save'd dict")
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=out_dir, no_dist=True)
