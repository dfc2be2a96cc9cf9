"""``--model hf:CONFIG``: any causal LM architecture of Hugging Face ``transformers``, built from a
local ``config.json`` (or a folder holding one) with ``AutoModelForCausalLM.from_config``.

Nothing is downloaded and no code from the config runs (``trust_remote_code`` stays off): the config
is JSON, and the architecture must be one that ``transformers`` itself ships. The weights start
from the seed like the built-in models'; ``--init-from`` takes a safetensors folder as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from trainer.config import HF_PREFIX
from trainer.errors import UserError

CONFIG_FILE = "config.json"


def config_file(spec: str) -> Path:
    """The ``config.json`` that ``hf:PATH`` names: PATH itself, or the file of that name in it."""
    path = Path(spec.removeprefix(HF_PREFIX))
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--model {spec}: no {CONFIG_FILE} at {file}; pass hf:FOLDER (holding {CONFIG_FILE}) or "
                        "hf:FILE.json, a path readable where the workers run")
    return file


def read_config(spec: str) -> Any:
    """The ``transformers`` config object of ``hf:PATH``, read offline."""
    file = config_file(spec)
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UserError(f"--model {spec}: transformers is not installed; pip install transformers (the image "
                        "has it)") from None
    try:
        config = AutoConfig.from_pretrained(str(file), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {spec}: transformers cannot read {file} ({first}); pass the config.json of a "
                        "causal LM architecture that transformers ships") from None
    config.use_cache = False  # training: no key/value cache is kept between forwards
    return config


def build_hf(spec: str) -> nn.Module:
    """A randomly initialised causal LM of the config's architecture (the caller seeds it)."""
    from transformers import AutoModelForCausalLM

    config = read_config(spec)
    try:
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"--model {spec}: {config.model_type!r} is not a causal LM that transformers builds "
                        f"({first}); pass the config of a ...ForCausalLM architecture") from None
