"""Run under torchrun by the tests: set up the real Trainer (it resumes), optionally train, dump full state.

Usage: dump_state.py OUT.pt {resume|train} [fsdp-train train flags]. Rank 0 writes the
gathered (unsharded) model and optimizer tensors plus progress, for bitwise comparison.
"""

import dataclasses
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from trainer.cli import build_parser
from trainer.config import resolve_config
from trainer.train import Trainer, configure_logging


def main() -> None:
    out, mode, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = resolve_config(build_parser().parse_args(["train", *flags]))
    trainer = Trainer(cfg)
    trainer.setup()
    configure_logging(trainer.rt.rank)
    if mode == "train":
        trainer.run()
    model_state, optim_state = get_state_dict(
        trainer.model, trainer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    resumed = trainer.checkpoints.resumed
    if trainer.rt.is_primary:
        torch.save({"model": model_state, "optim": optim_state["state"],
                    "step": trainer.progress.step, "samples_seen": trainer.progress.samples_seen,
                    "scheduler_last_epoch": trainer.scheduler.last_epoch,
                    "resumed_from": resumed and dataclasses.asdict(resumed.lineage),
                    "whole_items": resumed and resumed.whole_items}, out)
    trainer.close()


if __name__ == "__main__":
    main()
