"""Read a DCP checkpoint in one process, with no process group (inspection, inference, diffs).

Tensors are allocated from the checkpoint's own metadata at their global shape
and loaded through ``dcp.load(no_dist=True)``, which assembles every shard, so
what comes back is independent of the world size that wrote it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from trainer.errors import UserError


def require_dcp_dir(path: str | Path) -> Path:
    """``path`` as a DCP checkpoint directory, or a one-line error."""
    if not (Path(path) / ".metadata").is_file():
        raise UserError(f"{path}: not a DCP checkpoint (no .metadata); pick one from 'fsdp-train ckpt list'")
    return Path(path)


def read_metadata(path: str | Path) -> Metadata:
    return dcp.FileSystemReader(str(path)).read_metadata()


def tensor_entries(metadata: Metadata, prefix: str = "") -> dict[str, TensorStorageMetadata]:
    return {key: entry for key, entry in sorted(metadata.state_dict_metadata.items())
            if isinstance(entry, TensorStorageMetadata) and key.startswith(prefix)}


def read_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor whose checkpoint key starts with ``prefix``, full (unsharded), on CPU."""
    entries = tensor_entries(read_metadata(path), prefix)
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in entries.items()}
    if state:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights keyed by plain module FQN (``net1.weight``), ready for ``load_state_dict``."""
    prefix = "app.model."
    return {key[len(prefix):]: value for key, value in read_tensors(path, prefix).items()}
