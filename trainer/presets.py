"""Named sizes of the built-in transformer (``--preset``). The vocabulary comes from the data."""

from __future__ import annotations

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 8, "seq_len": 256},
    "125m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024},
    "1b": {"d_model": 2048, "n_layers": 16, "n_heads": 32, "seq_len": 2048},
}
