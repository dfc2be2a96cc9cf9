"""``--model package.module:function``: the user's own model, from the image or ``--python-path``.

``function(**model_args)`` returns an ``nn.Module`` that maps ``[batch, seq]`` token ids to
``[batch, seq, vocab]`` logits. Everything that goes wrong on the way is one line naming the
module and the fix: the user's code is the one place where a traceback is theirs to read, so the
exception's type and message are kept in that line.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from torch import nn

from trainer.errors import UserError


def add_python_path(folders: str | None) -> None:
    """Put ``--python-path`` folders (``:``-separated) first on ``sys.path``, once each."""
    for folder in reversed((folders or "").split(":")):
        if folder and folder not in sys.path:
            if not Path(folder).is_dir():
                raise UserError(f"--python-path {folder}: no such folder; mount your model package there or fix "
                                "the path")
            sys.path.insert(0, folder)


def build_plugin(spec: str, model_args: dict[str, Any], python_path: str | None) -> nn.Module:
    add_python_path(python_path)
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--model {spec}: cannot import {module_name} ({exc}); install it in the image "
                        "(FROM fsdp-train) or pass --python-path DIR") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--model {spec}: {module_name} has no function {function_name}; name one that returns "
                        "an nn.Module")
    try:
        model = function(**model_args)
    except Exception as exc:  # noqa: BLE001 - the user's code: any error is theirs to fix, in one line
        raise UserError(f"--model {spec}: {function_name}(**model_args) raised {type(exc).__name__}: {exc}; "
                        "fix the model or --model-args") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: {function_name}() returned {type(model).__name__}, not a "
                        "torch.nn.Module")
    return model
