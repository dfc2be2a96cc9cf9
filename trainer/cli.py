"""``fsdp-train``: the command-line front door.

Each subcommand is a pair, in the order ``fsdp-train --help`` lists them: ``add_<name>``
declares its flags, and the handler right below it hands off to the module that does the work
(imported there, so ``fsdp-train ckpt list`` never pays for what ``train`` needs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from trainer.errors import UserError, report

Handler = Callable[[argparse.Namespace], int]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the input and where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add(commands: argparse._SubParsersAction, name: str, handler: Handler, help_text: str,
         description: str | None = None) -> OneLineParser:
    parser = commands.add_parser(name, help=help_text, description=description or help_text)
    parser.set_defaults(handler=handler, parser=parser)
    return parser


# ---- prepare-data ---------------------------------------------------------------------------------
def add_prepare_data(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "prepare-data", prepare_data, "tokenize local text, JSONL or Parquet files into a "
                  "token dataset for --data", "Tokenize local files into train.bin, val.bin and dataset.json.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (read recursively)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty folder for the dataset")
    tokenizers = parser.add_mutually_exclusive_group()
    tokenizers.add_argument("--tokenizer", default="bytes", help="'bytes' (256 byte values + end-of-document; the "
                            "default) or a Hugging Face tokenizer.json")
    tokenizers.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                            help="train a byte-level BPE of VOCAB ids on the inputs; saved as DIR/tokenizer.json")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text (default text)")
    parser.add_argument("--glob", action="append", default=[], metavar="PATTERN",
                        help="also read files matching PATTERN in folders as plain text (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out paths matching PATTERN, e.g. '*/site-packages/*' (repeatable)")
    parser.add_argument("--non-utf8", choices=("error", "skip"), default="error",
                        help="a file or line that is not UTF-8: stop naming it (default), or skip and count it")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of whole documents held out for evaluation (default 0.01)")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per CPU, at most 8)")
    parser.add_argument("--skip-if-prepared", action="store_true", help="exit 0 without reading anything when --out "
                        "already holds a complete dataset (its dataset.json, written last): a job that prepares its "
                        "data on every start does it once")


def prepare_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.data.dataset import DATASET_FILE
    from trainer.data.prepare import PrepareOptions, prepare
    from trainer.data.sources import NonUtf8, SourceOptions, skip_report

    if args.skip_if_prepared and (Path(args.out) / DATASET_FILE).is_file():
        print(f"{args.out}: already holds a complete dataset ({DATASET_FILE}); nothing to do")
        return 0
    sources = SourceOptions(args.text_field, tuple(args.glob), tuple(args.exclude), NonUtf8(args.non_utf8))
    manifest = prepare(PrepareOptions(args.inputs, Path(args.out), args.tokenizer, args.train_tokenizer,
                                      args.val_fraction, args.workers, sources))
    skipped = f", {manifest['skipped_non_utf8']} non-UTF-8 input(s) skipped" if manifest["skipped_non_utf8"] else ""
    print(f"wrote {args.out}: {manifest['tokens']['train']:,} training and {manifest['tokens']['val']:,} held-out "
          f"tokens from {sum(manifest['documents'].values()):,} documents ({manifest['dtype']}, vocabulary "
          f"{manifest['vocab_size']}){skipped} in {manifest['seconds']:.1f}s")
    if report := skip_report(manifest["skipped_files"]):
        print(f"prepare-data: warning: {report}", file=sys.stderr)
    if manifest["tokens"]["val"] == 0:
        print(f"prepare-data: warning: no held-out tokens (--val-fraction {args.val_fraction:g} over "
              f"{sum(manifest['documents'].values())} documents), so --eval-every has nothing to evaluate; raise "
              "--val-fraction or add documents", file=sys.stderr)
    return 0


# ---- train ----------------------------------------------------------------------------------------
def add_train(commands: argparse._SubParsersAction) -> None:
    from trainer.config import add_config_arguments

    add_config_arguments(_add(commands, "train", train, "the worker entrypoint, run by torchrun (or alone as a "
                              "world of one)", "Train with FSDP2; resume from the newest committed checkpoint."))


def train(args: argparse.Namespace) -> int:
    from trainer.config import resolve_config
    from trainer.train import main as train_main

    return train_main(resolve_config(args))


# ---- local ----------------------------------------------------------------------------------------
def add_local(commands: argparse._SubParsersAction) -> None:
    from trainer.config import add_config_arguments

    parser = _add(commands, "local", local, "run torchrun standalone on this machine",
                  "Run N workers on this machine (torchrun --standalone).")
    parser.add_argument("--nproc", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="times torchrun restarts the workers in place after one fails; each restart resumes "
                        "from the newest checkpoint (default: 3)")
    add_config_arguments(parser)


def local(args: argparse.Namespace) -> NoReturn:
    from trainer.config import resolve_config
    from trainer.launcher.agent import exit_now
    from trainer.launcher.launch import run_local

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1 (got {args.nproc})")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0 (got {args.max_restarts})")
    exit_now(run_local(resolve_config(args), args.nproc, args.max_restarts))


# ---- launch ---------------------------------------------------------------------------------------
def add_launch(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "launch", launch, "container entrypoint: torchrun configured by PET_* variables",
                  "run torchrun's agent for -m trainer train ARGS in this process; it reads PET_* settings.")
    parser.add_argument("--nnodes", metavar="MIN:MAX",
                        help="elastic node range for torchrun; wins over PET_NNODES (which Kubeflow Trainer v2 "
                             "sets to the TrainJob's fixed numNodes)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="flags passed to 'fsdp-train train'")


def launch(args: argparse.Namespace) -> NoReturn:
    from trainer.config import resolve_config
    from trainer.launcher.agent import exit_now
    from trainer.launcher.launch import run_launch

    cfg = resolve_config(parse_args(["train", *args.train_args]))  # a bad flag fails here, once, in one line
    if args.nnodes is not None and not re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", args.nnodes):
        raise UserError(f"--nnodes must be N or MIN:MAX with positive integers (got {args.nnodes!r})")
    exit_now(run_launch(cfg, args.train_args, args.nnodes))


# ---- ckpt list | show | verify | diff -------------------------------------------------------------
def add_ckpt(commands: argparse._SubParsersAction) -> None:
    ckpt = commands.add_parser("ckpt", help="list, show, verify and diff checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=OneLineParser)
    listing = _add(ckpt_commands, "list", ckpt_list, "checkpoints in DIR, oldest first (partial ones too)")
    listing.add_argument("dir", metavar="DIR")
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    show = _add(ckpt_commands, "show", ckpt_show, "tensors, sharding, commit marker and lineage of a checkpoint")
    show.add_argument("checkpoint", metavar="CKPT")
    verify = _add(ckpt_commands, "verify", ckpt_verify,
                  "re-read every file against its recorded size and checksum; exit 1 naming each bad file")
    verify.add_argument("target", metavar="CKPT|DIR")
    verify.add_argument("--newest", action="store_true", help="with DIR: only the newest committed checkpoint")
    diff = _add(ckpt_commands, "diff", ckpt_diff, "per-tensor max abs/rel difference between two checkpoints")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")


def ckpt_list(args: argparse.Namespace) -> int:
    from trainer.checkpoint.layout import list_checkpoints

    rows = [info.summary() for info in list_checkpoints(args.dir)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints in {args.dir}")
        return 0
    print(f"{'step':>8}  {'committed':9}  {'world':>5}  {'MB':>9}  {'reason':10}  resumed_from")
    for row in rows:
        resumed = row["resumed_from"]
        resumed_text = f"step {resumed['step']} @ world {resumed['world_size']}" if resumed else "-"
        committed = "DAMAGED" if row["damaged"] else str(row["committed"]).lower()
        print(f"{row['step']:>8}  {committed:9}  {row['world_size'] or '-':>5}  "
              f"{row['bytes'] / 1e6:>9.2f}  {row['reason'] or '-':10}  {resumed_text}")
    for row in rows:
        if row["damaged"]:
            print(f"step {row['step']}: damaged ({row['damaged']}): a resume skips it; 'fsdp-train ckpt verify "
                  f"{row['path']}' checks every byte")
    return 0


def ckpt_show(args: argparse.Namespace) -> int:
    from trainer.tools.inspect_ckpt import show

    print(show(args.checkpoint))
    return 0


def ckpt_verify(args: argparse.Namespace) -> int:
    from trainer.tools.inspect_ckpt import verify

    ok, report = verify(args.target, newest_only=args.newest)
    print(report)
    return 0 if ok else 1


def ckpt_diff(args: argparse.Namespace) -> int:
    from trainer.tools.inspect_ckpt import diff

    print(diff(args.a, args.b))
    return 0


# ---- convert --------------------------------------------------------------------------------------
def add_convert(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "convert", convert, "convert between DCP and a single torch.save file")
    parser.add_argument("direction", choices=("dcp-to-torch", "torch-to-dcp"))
    parser.add_argument("source", metavar="SRC", help="CKPT (dcp-to-torch) or IN.pth (torch-to-dcp)")
    parser.add_argument("dest", metavar="DEST", help="OUT.pth (dcp-to-torch) or OUTDIR (torch-to-dcp)")


def convert(args: argparse.Namespace) -> int:
    from trainer.tools.convert import dcp_to_torch, torch_to_dcp

    (dcp_to_torch if args.direction == "dcp-to-torch" else torch_to_dcp)(args.source, args.dest)
    print(f"wrote {args.dest}")
    return 0


# ---- export-hf ------------------------------------------------------------------------------------
def add_export_hf(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "export-hf", export_hf, "write the model of a checkpoint as a Hugging Face folder "
                  "(safetensors, config.json, tokenizer): the transformer as LlamaForCausalLM, an hf: model as itself")
    parser.add_argument("checkpoint", metavar="CKPT", help="a committed checkpoint, or a run's folder (its newest)")
    parser.add_argument("out", metavar="OUTDIR", help="new or empty folder")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype (default fp32)")
    parser.add_argument("--max-shard-bytes", type=int, default=2 << 30,
                        help="start another .safetensors file past this size (default 2 GiB)")


def export_hf(args: argparse.Namespace) -> int:
    from trainer.tools.hf_export import export_hf as write

    files = write(args.checkpoint, args.out, args.dtype, args.max_shard_bytes)
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


# ---- infer ----------------------------------------------------------------------------------------
PROMPT_TEMPERATURE = 0.8


def add_infer(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "infer", infer, "load a checkpoint without a process group and run a forward pass")
    parser.add_argument("checkpoint", metavar="CKPT", help="a committed checkpoint (DIR/step-N), or a run's DIR: "
                        "its newest committed checkpoint")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help="toy: 16 numbers; transformer: token ids (comma or space separated); prints "
                       "the outputs or the generated ids as JSON")
    given.add_argument("--prompt", help="transformer trained on --data: text to continue; prints it with its "
                       "continuation")
    parser.add_argument("--generate", type=int, default=1, help="transformer: tokens to generate (default 1)")
    parser.add_argument("--temperature", type=float,
                        help="0: greedy; above 0: sample from softmax(logits / T), seeded (default: 0 with --input, "
                        f"{PROMPT_TEMPERATURE} with --prompt, where greedy decoding of a small model repeats itself)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    parser.add_argument("--tokenizer", help="with --prompt: 'bytes' or a tokenizer.json (default: the one of the "
                        "run's --data)")


def infer(args: argparse.Namespace) -> int:
    from trainer.tools.inference import encode_prompt, load_model, parse_input, run, run_tokenizer

    temperature = args.temperature if args.temperature is not None else 0.0 if args.prompt is None else \
        PROMPT_TEMPERATURE
    if args.generate < 1 or temperature < 0:
        raise UserError("--generate must be >= 1 and --temperature >= 0")
    model, cfg = load_model(args.checkpoint)
    if args.prompt is None:
        print(json.dumps(run(model, cfg, parse_input(cfg, args.input), args.generate, temperature, args.seed)))
        return 0
    if cfg.model == "toy":
        raise UserError("--prompt: the toy model takes numbers; pass --input")
    tokenizer = run_tokenizer(cfg, args.tokenizer)
    ids = run(model, cfg, encode_prompt(cfg, tokenizer, args.prompt), args.generate, temperature, args.seed)
    print(args.prompt + tokenizer.decode(ids))
    return 0


# ---- status | watch | plot ------------------------------------------------------------------------
def add_status(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "status", status, "step, loss, world size, last checkpoint and resumes of a run")
    parser.add_argument("dir", metavar="DIR", help="the run's --checkpoint-dir")
    parser.add_argument("--namespace", help="Kubernetes namespace of the release (default: default)")
    parser.add_argument("--release", help="also list the pods of this Helm release")


def status(args: argparse.Namespace) -> int:
    from trainer.tools.monitor import status as run_status

    print(run_status(args.dir, args.namespace, args.release))
    return 0


def add_watch(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "watch", watch, "follow metrics.jsonl with a live progress bar until the run ends")
    parser.add_argument("dir", metavar="DIR")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between reads (default 1)")
    parser.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")


def watch(args: argparse.Namespace) -> int:
    from trainer.tools.monitor import watch as follow

    return follow(args.dir, poll=args.poll, timeout=args.timeout)


def add_plot(commands: argparse._SubParsersAction) -> None:
    parser = _add(commands, "plot", plot, "loss curve with resumes (world size before -> after) and checkpoints")
    parser.add_argument("dir", metavar="DIR")
    parser.add_argument("-o", "--output", default="loss.png", help="PNG to write (default loss.png)")
    parser.add_argument("--width", type=float, default=10.0, help="inches (default 10)")
    parser.add_argument("--height", type=float, default=5.0, help="inches (default 5)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100)")


def plot(args: argparse.Namespace) -> int:
    from trainer.tools.monitor import plot as draw

    draw(args.dir, args.output, width=args.width, height=args.height, dpi=args.dpi)
    print(f"wrote {args.output}")
    return 0


# ---- the parser -----------------------------------------------------------------------------------
COMMANDS = (add_prepare_data, add_train, add_local, add_launch, add_ckpt, add_convert, add_export_hf, add_infer,
            add_status, add_watch, add_plot)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="fsdp-train", description="Elastic FSDP2 training with resharding DCP checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in COMMANDS:
        add(commands)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse a command line; ``launch`` passes every flag after it on to ``train``."""
    args, unknown = build_parser().parse_known_args(argv)
    if args.command == "launch":
        args.train_args = unknown + args.train_args
    elif unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        return report(exc)
