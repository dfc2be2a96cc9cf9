"""DCP <-> torch.save conversion, wrapping ``torch.distributed.checkpoint.format_utils``."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from trainer.checkpoint.reader import require_dcp_dir
from trainer.errors import UserError
from trainer.seeding import load_torch_file


def dcp_to_torch(checkpoint: str, out: str) -> None:
    """One ``.pth`` holding the whole (unsharded) state; loads with ``weights_only=True``."""
    require_dcp_dir(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(checkpoint, out)


def torch_to_dcp(source: str, out_dir: str) -> None:
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; pass a new directory")
    load_torch_file(source, source)  # a clear error for a missing or bad file, before format_utils' own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch_save_to_dcp(source, out_dir)
