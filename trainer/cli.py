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
    from trainer.config import resolve_config
    from trainer.launch import exec_launch

    resolve_config(parse_args(["train", *args.train_args]))  # a bad flag fails here, once, in one line
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


def _ckpt_show(args: argparse.Namespace) -> int:
    from trainer.inspect_ckpt import show

    print(show(args.checkpoint))
    return 0


def _ckpt_verify(args: argparse.Namespace) -> int:
    from trainer.inspect_ckpt import verify

    ok, report = verify(args.target, newest_only=args.newest)
    print(report)
    return 0 if ok else 1


def _ckpt_diff(args: argparse.Namespace) -> int:
    from trainer.inspect_ckpt import diff

    print(diff(args.a, args.b))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from trainer.convert import dcp_to_torch, torch_to_dcp

    (dcp_to_torch if args.direction == "dcp-to-torch" else torch_to_dcp)(args.source, args.dest)
    print(f"wrote {args.dest}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from trainer.inference import load_model, parse_input, run

    model, cfg = load_model(args.checkpoint)
    print(json.dumps(run(model, cfg, parse_input(cfg, args.input), args.generate)))
    return 0


def _status(args: argparse.Namespace) -> int:
    from trainer.monitor import status

    print(status(args.dir, args.namespace, args.release))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from trainer.monitor import watch

    return watch(args.dir, poll=args.poll, timeout=args.timeout)


def _plot(args: argparse.Namespace) -> int:
    from trainer.monitor import plot

    plot(args.dir, args.output, width=args.width, height=args.height, dpi=args.dpi)
    print(f"wrote {args.output}")
    return 0


def _add(commands: argparse._SubParsersAction, name: str, handler, help_text: str) -> OneLineParser:  # noqa: ANN001
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler, parser=parser)
    return parser


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

    ckpt = commands.add_parser("ckpt", help="list, show, verify and diff checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=OneLineParser)
    ckpt_list = ckpt_commands.add_parser("list", help="checkpoints in DIR, oldest first (partial ones too)")
    ckpt_list.add_argument("dir", metavar="DIR")
    ckpt_list.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ckpt_list.set_defaults(handler=_ckpt_list, parser=ckpt_list)
    show = _add(ckpt_commands, "show", _ckpt_show, "tensors, sharding, commit marker and lineage of a checkpoint")
    show.add_argument("checkpoint", metavar="CKPT")
    verify = _add(ckpt_commands, "verify", _ckpt_verify,
                  "re-read every file against its recorded size and checksum; exit 1 naming each bad file")
    verify.add_argument("target", metavar="CKPT|DIR")
    verify.add_argument("--newest", action="store_true", help="with DIR: only the newest committed checkpoint")
    diff = _add(ckpt_commands, "diff", _ckpt_diff, "per-tensor max abs/rel difference between two checkpoints")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")

    convert = _add(commands, "convert", _convert, "convert between DCP and a single torch.save file")
    convert.add_argument("direction", choices=("dcp-to-torch", "torch-to-dcp"))
    convert.add_argument("source", metavar="SRC", help="CKPT (dcp-to-torch) or IN.pth (torch-to-dcp)")
    convert.add_argument("dest", metavar="DEST", help="OUT.pth (dcp-to-torch) or OUTDIR (torch-to-dcp)")

    infer = _add(commands, "infer", _infer, "load a checkpoint without a process group and run a forward pass")
    infer.add_argument("checkpoint", metavar="CKPT")
    infer.add_argument("--input", required=True,
                       help="toy: 16 numbers; transformer: token ids (comma or space separated)")
    infer.add_argument("--generate", type=int, default=1, help="transformer: tokens to generate greedily (default 1)")

    status = _add(commands, "status", _status, "step, loss, world size, last checkpoint and resumes of a run")
    status.add_argument("dir", metavar="DIR", help="the run's --checkpoint-dir")
    status.add_argument("--namespace", help="Kubernetes namespace of the release (default: default)")
    status.add_argument("--release", help="also list the pods of this Helm release")

    watch = _add(commands, "watch", _watch, "follow metrics.jsonl with a live progress bar until the run ends")
    watch.add_argument("dir", metavar="DIR")
    watch.add_argument("--poll", type=float, default=1.0, help="seconds between reads (default 1)")
    watch.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")

    plot = _add(commands, "plot", _plot, "loss curve with resumes (world size before -> after) and checkpoints")
    plot.add_argument("dir", metavar="DIR")
    plot.add_argument("-o", "--output", default="loss.png", help="PNG to write (default loss.png)")
    plot.add_argument("--width", type=float, default=10.0, help="inches (default 10)")
    plot.add_argument("--height", type=float, default=5.0, help="inches (default 5)")
    plot.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100)")
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
        print(f"fsdp-train: error: {exc}", file=sys.stderr)
        return 2
