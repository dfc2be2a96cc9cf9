"""fsdp-train: elastic FSDP2 training with resharding DCP checkpoints."""

__version__ = "0.1.0"
