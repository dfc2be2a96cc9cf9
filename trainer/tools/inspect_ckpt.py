"""``ckpt show``, ``ckpt verify`` and ``ckpt diff``: what is in a checkpoint, is it intact, what changed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from trainer.checkpoint import integrity, safe_read
from trainer.checkpoint.layout import COMMIT_FILE, CheckpointInfo, committed_checkpoints, open_checkpoint
from trainer.checkpoint.reader import read_tensors, require_dcp_dir, tensor_entries
from trainer.checkpoint.safe_read import METADATA_FILE
from trainer.errors import UserError


def _sharding(entry) -> str:
    chunks = entry.chunks
    if len(chunks) == 1:
        return "1 chunk"
    dims = {d for chunk in chunks for d, (off, size) in enumerate(zip(chunk.offsets, chunk.sizes))
            if (off, size) != (0, entry.size[d])}
    return f"{len(chunks)} chunks along dim {','.join(map(str, sorted(dims))) or '-'}"


def show(path: str) -> str:
    info = open_checkpoint(path)
    marker = info.marker
    resumed = marker.resumed_from and dataclasses.asdict(marker.resumed_from)
    lines = [f"checkpoint {info.path}",
             f"  step {marker.step}, world size {marker.world_size}, {marker.bytes / 1e6:.2f} MB, "
             f"reason {marker.reason.value}, torch {marker.torch_version}, format {marker.format}",
             f"  sharding: {marker.sharding or '-'}",
             f"  resumed_from: {json.dumps(resumed)}",
             f"  model: {json.dumps(marker.shape)}",
             f"  {'tensor':56} {'global shape':>16} {'dtype':>8} {'bytes':>12}  sharding"]
    metadata = safe_read.read_metadata(info.path, marker.files.get(METADATA_FILE))
    for key, entry in tensor_entries(metadata).items():
        numel = 1
        for dim in entry.size:
            numel *= dim
        nbytes = numel * torch.empty((), dtype=entry.properties.dtype).element_size()
        shape = "x".join(map(str, entry.size)) or "scalar"
        lines.append(f"  {key:56} {shape:>16} {str(entry.properties.dtype).removeprefix('torch.'):>8} "
                     f"{nbytes:>12}  {_sharding(entry)}")
    lines.append("  files: " + ", ".join(f"{name} ({entry['bytes']} B, {integrity.describe(entry)})"
                                          for name, entry in sorted(marker.files.items())))
    return "\n".join(lines)


def _targets(path: str) -> list[CheckpointInfo]:
    root = Path(path)
    if (root / COMMIT_FILE).exists() or (root / METADATA_FILE).exists():
        return [open_checkpoint(root)]
    found = committed_checkpoints(root)
    if not found:
        raise UserError(f"{path}: neither a committed checkpoint nor a directory holding any")
    return found


def verify(path: str, newest_only: bool = False) -> tuple[bool, str]:
    """Re-read every file of one checkpoint, or of every (or the newest) committed one in a directory."""
    ok, lines = True, []
    targets = _targets(path)
    for info in targets[-1:] if newest_only else targets:
        problems = integrity.problems(info.path, info.marker.files)
        if not problems:  # intact as recorded; now also safe to open?
            try:
                safe_read.read_metadata(info.path, info.marker.files.get(METADATA_FILE))
            except UserError as exc:
                problems = [str(exc)]
        ok = ok and not problems
        status = "OK" if not problems else "BAD"
        lines.append(f"{status} step {info.step} ({len(info.marker.files)} files, {info.marker.bytes} B)")
        lines += [f"  {problem}" for problem in problems]
    return ok, "\n".join(lines)


def diff(a: str, b: str) -> str:
    """Compare every tensor of two DCP checkpoints (any world size or layout)."""
    left, right = read_tensors(require_dcp_dir(a)), read_tensors(require_dcp_dir(b))
    only = sorted(set(left) ^ set(right))
    lines = [f"{'tensor':56} {'max abs diff':>14} {'max rel diff':>14}"]
    worst = 0.0
    for key in sorted(set(left) & set(right)):
        x, y = left[key].double(), right[key].double()
        if x.shape != y.shape:
            lines.append(f"{key:56} shape {tuple(x.shape)} vs {tuple(y.shape)}")
            worst = float("inf")
            continue
        delta = (x - y).abs()
        abs_diff = delta.max().item() if delta.numel() else 0.0
        rel_diff = (delta / y.abs().clamp_min(1e-12)).max().item() if delta.numel() else 0.0
        worst = max(worst, abs_diff)
        lines.append(f"{key:56} {abs_diff:>14.3e} {rel_diff:>14.3e}")
    lines += [f"{key:56} only in {'A' if key in left else 'B'}" for key in only]
    verdict = "identical" if worst == 0 and not only else f"max abs diff {worst:.3e}"
    lines.append(f"summary: {len(set(left) & set(right))} tensors compared, {verdict}")
    return "\n".join(lines)
