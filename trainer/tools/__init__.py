"""Offline tools, each run in one ordinary process with no process group: ``infer``, ``convert``,
``export-hf``, ``ckpt show/verify/diff`` and ``status/watch/plot``. They read checkpoints through
the engine's safe readers and runs through their ``metrics.jsonl``; nothing below imports them."""
