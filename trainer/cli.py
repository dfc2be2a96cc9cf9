"""``fsdp-train``: the command-line front door. Each subcommand hands off to its own module."""

from __future__ import annotations

import argparse
import json
import sys
from trainer.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the input and where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _train(args: argparse.Namespace) -> int:
    from trainer.config import resolve_config
    from trainer.train import main as train_main

    return train_main(resolve_config(args))


def _local(args: argparse.Namespace) -> int:
    from trainer.config import resolve_config
    from trainer.launch import run_local

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1 (got {args.nproc})")
    return run_local(resolve_config(args), args.nproc)


def _launch(args: argparse.Namespace) -> int:
    from trainer.launch import exec_launch

    exec_launch(args.train_args)
    return 1  # not reached


def _ckpt_list(args: argparse.Namespace) -> int:
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
        print(f"{row['step']:>8}  {str(row['committed']).lower():9}  {row['world_size'] or '-':>5}  "
              f"{row['bytes'] / 1e6:>9.2f}  {row['reason'] or '-':10}  {resumed_text}")
    return 0


def build_parser() -> OneLineParser:
    from trainer.config import add_config_arguments

    parser = OneLineParser(prog="fsdp-train", description="Elastic FSDP2 training with resharding DCP checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="the worker entrypoint, run by torchrun (or alone as a world of one)",
                                description="Train with FSDP2; resume from the newest committed checkpoint.")
    add_config_arguments(train)
    train.set_defaults(handler=_train, parser=train)

    local = commands.add_parser("local", help="run torchrun standalone on this machine",
                                description="Run N workers on this machine (torchrun --standalone).")
    local.add_argument("--nproc", type=int, default=2, help="worker processes (default: 2)")
    add_config_arguments(local)
    local.set_defaults(handler=_local, parser=local)

    launch = commands.add_parser("launch", help="container entrypoint: torchrun configured by PET_* variables",
                                 description="exec torchrun -m trainer train ARGS; torchrun reads PET_* settings.")
    launch.add_argument("train_args", nargs=argparse.REMAINDER, help="flags passed to 'fsdp-train train'")
    launch.set_defaults(handler=_launch, parser=launch)

    ckpt = commands.add_parser("ckpt", help="list and inspect checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=OneLineParser)
    ckpt_list = ckpt_commands.add_parser("list", help="checkpoints in DIR, oldest first (partial ones too)")
    ckpt_list.add_argument("dir", metavar="DIR")
    ckpt_list.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ckpt_list.set_defaults(handler=_ckpt_list, parser=ckpt_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"fsdp-train: error: {exc}", file=sys.stderr)
        return 2
