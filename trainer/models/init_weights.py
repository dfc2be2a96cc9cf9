"""Seed a fresh run from a ``torch.save``d model state dict or a Hugging Face safetensors folder,
sharded at whatever world size starts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from trainer.checkpoint.app_state import STATE_KEY
from trainer.errors import UserError


def load_torch_file(path: str, label: str) -> object:
    """``torch.load(weights_only=True)`` with one-line errors that start with ``label``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{label}: no such file; pass a .pth written by torch.save") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise UserError(f"{label}: not a loadable torch.save file ({type(exc).__name__})") from None


def read_model_state(path: str, hf_names: bool = False) -> dict[str, torch.Tensor]:
    """A plain model state dict, the model part of a ``fsdp-train convert dcp-to-torch`` file, or the
    weights of a safetensors folder: under this project's names (``export-hf``'s Llama), or as
    saved (``hf_names``: an ``hf:`` model's own)."""
    from trainer.models.hf_llama import is_hf_folder, read_hf_weights

    if is_hf_folder(path):
        return read_hf_weights(path, rename=not hf_names)
    state = load_torch_file(path, f"--init-from {path}")
    if isinstance(state, dict) and STATE_KEY in state and "model" in state[STATE_KEY]:
        state = state[STATE_KEY]["model"]
    if not isinstance(state, dict):
        raise UserError(f"--init-from {path}: expected a state dict (mapping of names to tensors)")
    return state


def with_tied_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every name of a tied parameter (GPT-2's ``lm_head.weight`` is its token
    embedding) filled in from another name of the same parameter: a saved folder holds it once."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    filled = dict(state)
    for tied in (group for group in names.values() if len(group) > 1):
        present = next((name for name in tied if name in state), None)
        for name in tied if present else ():
            filled.setdefault(name, state[present])
    return filled


def check_matches(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"--init-from {Path(path).name}: keys do not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check the model flags")
    wrong = [name for name, shape in expected.items() if tuple(state[name].shape) != shape]
    if wrong:
        raise UserError(f"--init-from {Path(path).name}: shapes differ for {wrong[:3]}; check the model flags")


def initial_state(model: nn.Module, path: str, hf_names: bool = False) -> dict[str, torch.Tensor]:
    """``--init-from``'s weights, tied names filled in, checked against ``model`` (the preflight's
    meta model or a worker's)."""
    state = with_tied_names(model, read_model_state(path, hf_names))
    check_matches(model, state, path)
    return state


def load_initial_weights(model: nn.Module, path: str, hf_names: bool = False) -> None:
    state = initial_state(model, path, hf_names)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
