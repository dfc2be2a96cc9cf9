"""Typed training config, read from defaults < YAML file < environment < flags.

The config is flat on purpose: one name per setting, spelled the same as a
YAML key (``max_steps``), a flag (``--max-steps``) and an environment variable
(``FSDP_TRAIN_MAX_STEPS``), so the Helm chart, the CLI and the docs cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError

ENV_PREFIX = "FSDP_TRAIN_"

# Named sizes of the built-in transformer (``--preset``): values of the size settings below, resolved
# before any model exists. The vocabulary comes from the data.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 8, "seq_len": 256},
    "125m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024},
    "1b": {"d_model": 2048, "n_layers": 16, "n_heads": 32, "seq_len": 2048},
}

# ``--model package.module:function``: the user's own model (``models.plugins`` builds it).
PLUGIN_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


# ``--model hf:CONFIG``: a ``transformers`` causal LM from a local config (``models.hf`` builds it).
HF_PREFIX = "hf:"


def is_plugin(model: str) -> bool:
    return PLUGIN_SPEC.fullmatch(model) is not None


def is_hf(model: str) -> bool:
    return model.startswith(HF_PREFIX) and len(model) > len(HF_PREFIX)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # Model: the fields marked "shape" decide parameter shapes and must match a resumed checkpoint.
    model: str = _opt("toy", "model to train: toy, transformer, hf:CONFIG (a transformers causal LM built from a "
                      "local config.json or a folder holding one; no download), or your own as "
                      "package.module:function (called with --model-args; returns an nn.Module mapping [batch, seq] "
                      "token ids to logits: a tensor, an object with .logits, or a tuple led by them)", shape=True)
    model_args: dict = field(default_factory=dict, metadata={
        "help": "keyword arguments for your --model function, as a JSON object (a mapping in YAML)", "shape": True})
    shard_modules: str | None = _opt(None, "your --model: FSDP2 shards the modules whose names match this glob "
                                     "(e.g. 'layers.*'); default: shard_units() if it has one, else the entries "
                                     "of its ModuleList children")
    python_path: str | None = _opt(None, "folders (':'-separated) searched first for your --model's package")
    vocab_size: int | None = _opt(None, "vocabulary: the ids the data holds, and the built-in transformer's "
                                  "width; default: the dataset's (--data), or 256 for synthetic data", shape=True)
    d_model: int = _opt(64, "transformer width", shape=True)
    n_layers: int = _opt(2, "transformer blocks", shape=True)
    n_heads: int = _opt(4, "attention heads (must divide d_model)", shape=True)
    seq_len: int = _opt(32, "transformer context length in tokens", shape=True)
    ffn_mult: int = _opt(4, "MLP size: the SwiGLU hidden width is 2/3 of ffn_mult x d_model", shape=True)
    preset: str | None = _opt(None, "transformer size preset (d_model, n_layers, n_heads, seq_len); any of those "
                              "flags given as well wins over it", choices=tuple(PRESETS))
    # Data.
    data: str | None = _opt(None, "token dataset folder from 'fsdp-train prepare-data'; without it, synthetic data")
    allow_data_change: bool = _opt(False, "resume even though --data differs from the checkpoint's dataset")
    eval_every: int = _opt(0, "compute the held-out loss every N steps (0: never)")
    eval_batches: int = _opt(4, "global batches of held-out samples per evaluation")
    # Optimisation.
    max_steps: int = _opt(100, "train until this global step")
    global_batch_size: int = _opt(32, "samples per step across all ranks (fixed; independent of world size)")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    warmup_steps: int = _opt(10, "linear warm-up steps before cosine decay")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr")
    decay_steps: int = _opt(0, "cosine decay horizon in steps; 0 means --max-steps (set it to extend a run exactly)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    micro_batch_size: int | None = _opt(None, "run each rank's share of the global batch in micro-batches of at "
                                        "most this many samples, accumulating gradients (memory per rank stays "
                                        "bounded at any world size; the update is the same)")
    max_grad_norm: float = _opt(0.0, "clip gradients to this global norm and log grad_norm (0: off)")
    mixed_precision: str = _opt("none", "bf16: FSDP2 computes in bf16 and reduces gradients in fp32; weights and "
                                "optimizer state stay fp32 (and so do checkpoints)", choices=("none", "bf16"))
    activation_checkpointing: str = _opt("none", "full: recompute each shard unit's activations in the backward "
                                         "pass instead of keeping them (less memory, about a third more compute)",
                                         choices=("none", "full"))
    compile: bool = _opt(False, "compile each shard unit with torch.compile (module names unchanged; the first "
                         "steps pay the compile time)")
    seed: int = _opt(0, "seed for init and data; randomness comes from (seed, step), never rank")
    # Checkpointing.
    checkpoint_dir: str = _opt("./checkpoints", "shared directory for DCP checkpoints, metrics and the job lock")
    checkpoint_every: int | str = _opt(10, "save a checkpoint every K steps (and always at the end), or auto: the "
                                       "Young/Daly interval from the measured save cost and this job's failures")
    expected_mtbf: float = _opt(3600.0, "with --checkpoint-every auto: the seconds between failures to expect "
                                "until the job's first failure (then its own failures decide)")
    snapshot_every: int | str = _opt(1, "take a memory snapshot of every rank's state every K steps (0: off), "
                                     "kept in node-local shared memory, so a restarted worker restores from memory "
                                     "instead of disk; needs the agent of 'fsdp-train local' or 'launch'; or auto: "
                                     "the Young/Daly interval from the snapshot's stall and this job's failures")
    checkpoint_first_step: bool = _opt(False, "also save (and read back) right after step 1, so broken storage "
                                       "fails in the first minute")
    checkpoint_mode: str = _opt("async", "periodic saves: async (stage, then write in background) or sync",
                                choices=("async", "sync"))
    checkpoint_writer: str = _opt("process", "who writes async saves: a writer process per rank (off the trainer's "
                                  "GIL; a thread where it cannot start) or a thread", choices=("process", "thread"))
    keep_last: int = _opt(3, "committed checkpoints to keep")
    resume_from: str | None = _opt(None, "resume from this step number or checkpoint path instead of the newest")
    no_resume: bool = _opt(False, "start fresh even if committed checkpoints exist")
    init_from: str | None = _opt(None, "start a fresh run from a torch.save'd model state dict (.pth) or a Hugging "
                                 "Face safetensors folder (as export-hf writes)")
    # Runtime.
    device: str = _opt("auto", "auto: CUDA+NCCL if a GPU is present, else CPU+gloo", choices=("auto", "cpu", "cuda"))
    log_every: int = _opt(1, "log a metrics line every N steps")
    lock_ttl: float = _opt(60.0, "seconds after which a silent job's lock on --checkpoint-dir counts as stale")
    collective_timeout: float = _opt(120.0, "seconds a collective waits for a hung or cut-off peer before the "
                                     "workers fail and torchrun restarts them; must exceed the slowest rank's "
                                     "checkpoint write")
    shutdown_grace: float = _opt(25.0, "seconds allowed for the emergency checkpoint after SIGTERM")
    progress: bool = _opt(False, "show a live progress bar on rank 0 instead of log lines")
    tensorboard: bool = _opt(False, "also write the metrics as TensorBoard event files into "
                             "<checkpoint-dir>/tensorboard (resumes as text events)")

    def __post_init__(self) -> None:
        if self.vocab_size is None:
            self.vocab_size = data_vocabulary(self.data)

    def shape_fields(self) -> dict[str, Any]:
        """The settings that decide parameter shapes (compared on resume)."""
        names = [f.name for f in fields(self) if f.metadata.get("shape") and f.name != "model_args"]
        if self.model == "toy":
            names = ["model"]
        elif self.model != "transformer":
            names = ["model", "model_args"]
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        positive = ["vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "ffn_mult",
                    "global_batch_size", "keep_last", "log_every"]
        if self.checkpoint_every != AUTO:
            positive.append("checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UserError(f"--micro-batch-size must be >= 1 (got {self.micro_batch_size}); leave it out to run "
                            "each rank's share in one pass")
        non_negative = ["eval_every", "max_grad_norm"] + (["snapshot_every"] if self.snapshot_every != AUTO else [])
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        if self.eval_batches < 1:
            raise UserError(f"--eval-batches must be >= 1 (got {self.eval_batches})")
        if self.expected_mtbf <= 0:
            raise UserError(f"--expected-mtbf must be > 0 seconds (got {self.expected_mtbf})")
        if self.max_steps < 0:
            raise UserError(f"--max-steps must be >= 0 (got {self.max_steps})")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0 (got {self.lr})")
        if self.collective_timeout <= 0:
            raise UserError(f"--collective-timeout must be > 0 seconds (got {self.collective_timeout})")
        if self.d_model % self.n_heads:
            raise UserError(f"--n-heads ({self.n_heads}) must divide --d-model ({self.d_model})")
        if self.model not in ("toy", "transformer") and not is_plugin(self.model) and not is_hf(self.model):
            raise UserError(f"--model {self.model!r}: use toy, transformer, hf:CONFIG or package.module:function")
        if self.resume_from is not None and self.no_resume:
            raise UserError("--resume-from and --no-resume contradict each other: pass only one")

    def check_world_size(self, world_size: int) -> None:
        if world_size > self.global_batch_size:
            raise UserError(
                f"world size {world_size} is larger than --global-batch-size {self.global_batch_size}: "
                f"use at most {self.global_batch_size} processes or raise --global-batch-size"
            )


SYNTHETIC_VOCABULARY = 256


def data_vocabulary(data: str | None) -> int:
    """The vocabulary of ``--data`` (from its ``dataset.json``), or of the synthetic data. A dataset
    that cannot be read here is left to the data loader, which says why in its own line."""
    if data:
        try:
            return int(json.loads(Path(data, "dataset.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return SYNTHETIC_VOCABULARY


def _flag(name: str) -> str:
    return name.replace("_", "-")


AUTO = "auto"


def int_or_auto(raw: Any) -> int | str:
    """A step count, or ``auto`` (the setting chooses itself)."""
    if isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    if isinstance(raw, float) or (isinstance(raw, str) and not raw.strip().lstrip("-").isdigit()):
        raise ValueError(raw)
    return int(raw)


int_or_auto.type_name = "step count or 'auto'"  # type: ignore[attr-defined]


def json_object(raw: Any) -> dict:
    """A mapping: as it is (YAML), or a JSON object (a flag or an environment variable)."""
    value = raw if isinstance(raw, dict) else json.loads(raw) if isinstance(raw, str) else None
    if not isinstance(value, dict):
        raise ValueError(raw)
    return value


json_object.type_name = "JSON object"  # type: ignore[attr-defined]


def _field_types() -> dict[str, type]:
    types = {"int": int, "float": float, "bool": bool, "str": str, "str | None": str, "int | str": int_or_auto,
             "int | None": int, "dict": json_object}
    return {f.name: types[str(f.type)] for f in fields(TrainConfig)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; unset flags stay absent so lower layers show through."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (keys as below, with underscores)")
    types = _field_types()
    for f in fields(TrainConfig):
        kind = types[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            # "--no-resume" is itself the negative form; other switches get --x / --no-x.
            action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, action=action,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, type=_for_argparse(kind), default=argparse.SUPPRESS,
                                choices=choices, metavar=None if choices else f.name.upper(), help=help_text)


def _for_argparse(kind: Any) -> Any:
    """argparse names a plain type in its message; a parse function gets its own wording."""
    if not hasattr(kind, "type_name"):
        return kind

    def parse(raw: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.type_name} (got {raw!r})") from None

    return parse


def setting_choices(name: str) -> tuple[str, ...]:
    """The values a setting accepts, for tools that take the same setting (``bench.overhead --writer``)."""
    return next(f.metadata["choices"] for f in fields(TrainConfig) if f.name == name)


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = _field_types()[name]
    if raw is None:
        return None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if isinstance(raw, bool):
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        kind_name = getattr(kind, "type_name", kind.__name__)
        raise UserError(f"{source}: {name}={raw!r} is not a valid {kind_name}") from None


def _from_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror}); pass an existing YAML file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of setting: value at the top level")
    known = {f.name for f in fields(TrainConfig)}
    normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see 'fsdp-train train --help'")
    return {k: _coerce(k, v, f"--config {path}") for k, v in normalised.items()}


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values = {}
    for f in fields(TrainConfig):
        key = ENV_PREFIX + f.name.upper()
        if key in environ:
            values[f.name] = _coerce(f.name, environ[key], f"environment {key}")
    return values


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see 'fsdp-train train --help')")


def parse_train_args(argv: list[str]) -> TrainConfig:
    """The config of ``fsdp-train train ARGV``, for the processes that start workers or are one (the
    agent, a forked worker) without the whole command line's parser; a bad flag is a ``UserError``."""
    parser = _RaisingParser(prog="fsdp-train train", add_help=False)
    add_config_arguments(parser)
    return resolve_config(parser.parse_args(argv))


def resolve_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> TrainConfig:
    """Merge the layers: defaults < --config YAML < FSDP_TRAIN_* environment < flags."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(_from_yaml(config_path))
    values.update(_from_env(environ))
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    config = TrainConfig(**with_preset(values))
    config.validate()
    return config


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """The preset's sizes under the settings given explicitly (in any layer)."""
    preset = values.get("preset")
    if preset is None:
        return values
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **values}


def config_from_record(values: dict[str, Any], source: str) -> TrainConfig:
    """A config recorded elsewhere (a checkpoint's ``commit.json``), checked as any input is: known
    settings only, each of its type, then validated."""
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source}: unknown setting(s) {', '.join(map(str, unknown))}; written by another "
                        "fsdp-train version?")
    checked = {}
    for name, value in values.items():
        optional, choices = str(known[name].type).endswith("| None"), known[name].metadata.get("choices")
        wrong_text = _field_types()[name] is str and value is not None and not isinstance(value, str)
        if (value is None and not optional) or wrong_text or (choices and value is not None and value not in choices):
            raise UserError(f"{source}: {name}={value!r} is not a valid setting")
        checked[name] = _coerce(name, value, source)
    config = TrainConfig(**checked)
    config.validate()
    return config


def config_to_args(config: TrainConfig) -> list[str]:
    """Render a config back into flags (used to hand a validated config to torchrun workers)."""
    argv: list[str] = []
    preset_keys = PRESETS[config.preset] if config.preset else {}
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value == default and f.name not in preset_keys:  # a preset would fill those in; a None resolves again
            continue
        if isinstance(value, bool):
            if value or not f.name.startswith("no_"):
                argv.append(f"--{_flag(f.name)}" if value else f"--no-{_flag(f.name)}")
        else:
            argv += [f"--{_flag(f.name)}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv
