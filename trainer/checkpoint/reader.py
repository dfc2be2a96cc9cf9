"""Read a DCP checkpoint in one process, with no process group (inspection, inference, conversion).

Tensors are allocated from the checkpoint's own metadata at their global shape and loaded
through ``dcp.load(no_dist=True)``, which assembles every shard, so what comes back is
independent of the world size that wrote it. Everything is read as data (``safe_read``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from trainer.checkpoint.failures import user_error_inside
from trainer.checkpoint.safe_read import METADATA_FILE, SafeLoadPlanner, SafeReader, assign
from trainer.errors import UserError


def require_dcp_dir(path: str | Path) -> Path:
    """``path`` as a DCP checkpoint directory, or a one-line error."""
    if not (Path(path) / METADATA_FILE).is_file():
        raise UserError(f"{path}: not a DCP checkpoint (no {METADATA_FILE}); pick one from 'fsdp-train ckpt list'")
    return Path(path)


def tensor_entries(metadata: Metadata, prefix: str = "") -> dict[str, TensorStorageMetadata]:
    return {key: entry for key, entry in sorted(metadata.state_dict_metadata.items())
            if isinstance(entry, TensorStorageMetadata) and key.startswith(prefix)}


def _load(state: dict[str, Any], reader: SafeReader) -> None:
    """``dcp.load`` in this process, as data; a refusal or a damaged file is one line."""
    path = Path(reader.path)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path), no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP wraps every failure
        inner = user_error_inside(exc)
        if inner is not None:
            raise inner from None
        raise UserError(f"{path}: could not be read ({type(exc).__name__}); check it with "
                        "'fsdp-train ckpt verify'") from None


def read_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor whose checkpoint key starts with ``prefix``, full (unsharded), on CPU."""
    reader = SafeReader(require_dcp_dir(path))
    entries = tensor_entries(reader.metadata, prefix)
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in entries.items()}
    if state:
        _load(state, reader)
    return state


def read_state(path: str | Path) -> dict[str, Any]:
    """The whole state, tensors full and on CPU, nested as it was saved (``app.model.<fqn>`` under
    ``state["app"]["model"]``)."""
    reader = SafeReader(require_dcp_dir(path))
    metadata = reader.metadata
    flat: dict[str, Any] = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
                            if isinstance(entry, TensorStorageMetadata) else None
                            for key, entry in metadata.state_dict_metadata.items()}
    _load(flat, reader)
    nested: dict[str, Any] = {}
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    for key, value in flat.items():
        assign(nested, tuple(paths.get(key, (key,))), value)
    return nested


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights keyed by plain module FQN (``net1.weight``), ready for ``load_state_dict``."""
    prefix = "app.model."
    return {key[len(prefix):]: value for key, value in read_tensors(path, prefix).items()}
