"""--model package.module:function: a user's model from a folder on --python-path trains, resumes at
another world size and is inferred; everything that can go wrong with it is one line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import error_lines, run_cli, start_records, step_records
from trainer.checkpoint.layout import step_dir

pytestmark = pytest.mark.torchrun

PACKAGE = '''
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, vocab, width, depth):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def build(vocab=50, width=16, depth=2):
    return Residual(vocab, width, depth)


def broken(**kwargs):
    raise RuntimeError("needs a GPU")


def not_a_module(**kwargs):
    return 42
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    (root / "mymodels").mkdir()
    (root / "mymodels" / "__init__.py").write_text("")
    (root / "mymodels" / "residual.py").write_text(textwrap.dedent(PACKAGE))
    return root


def flags(plugin_path: Path, function: str = "build", **args) -> list[str]:
    return ["--model", f"mymodels.residual:{function}", "--model-args", json.dumps({"depth": 3, **args}),
            "--python-path", str(plugin_path), "--vocab-size", "50", "--seq-len", "8", "--global-batch-size", "6",
            "--checkpoint-every", "3", "--no-progress"]


def test_a_plugin_model_trains_resumes_resharded_and_is_inferred(plugin_path, ckpt_dir):
    first = run_cli("local", "--nproc", "2", *flags(plugin_path), "--max-steps", "6", "--checkpoint-dir",
                    str(ckpt_dir), check=True)
    assert "returned a view tensor" not in first.stderr, "FSDP2's view warning: the step never writes into the output"
    assert "restoring from disk, not memory" not in first.stderr, "a job's first start has nothing to restore"
    run_cli("local", "--nproc", "3", *flags(plugin_path), "--max-steps", "9", "--checkpoint-dir", str(ckpt_dir),
            check=True)
    assert start_records(ckpt_dir)[-1]["resumed_from"] == {"step": 6, "world_size": 2}
    losses = [r["loss"] for r in step_records(ckpt_dir)]
    assert len(losses) == 9 and losses[-1] < losses[0]
    shown = run_cli("ckpt", "show", str(step_dir(ckpt_dir, 9)), check=True).stdout
    assert "app.model.blocks.2.0.weight" in shown and "3 chunks along dim 0" in shown
    ids = json.loads(run_cli("infer", str(step_dir(ckpt_dir, 9)), "--input", "1 2 3", "--generate", "4",
                             check=True).stdout)
    assert len(ids) == 4 and all(0 <= i < 50 for i in ids)
    proc = run_cli("local", "--nproc", "1", *flags(plugin_path, depth=4), "--max-steps", "12", "--checkpoint-dir",
                   str(ckpt_dir))
    assert proc.returncode == 2 and "model_args={'depth': 3} in checkpoint vs {'depth': 4} now" in proc.stderr


@pytest.mark.parametrize("change,message", [
    ({"--model": "nosuch.models:build"}, "--model nosuch.models:build: cannot import nosuch.models"),
    ({"--model": "mymodels.residual:missing"}, "mymodels.residual has no function missing"),
    ({"--model": "mymodels.residual:broken"}, "broken(**model_args) raised RuntimeError: needs a GPU"),
    ({"--model": "mymodels.residual:not_a_module"}, "not_a_module() returned int, not a torch.nn.Module"),
    ({"--model-args": '{"depth": '}, "--model-args: expected a JSON object"),
    ({"--shard-modules": "layers.*"}, "--shard-modules layers.*: matches no module of --model"),
    ({"--python-path": "/nonexistent/models"}, "--python-path /nonexistent/models: no such folder"),
])
def test_a_bad_plugin_is_one_line_and_starts_nothing(plugin_path, ckpt_dir, change, message):
    args = flags(plugin_path)
    extra = []
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            extra += [flag, value]
    proc = run_cli("local", "--nproc", "2", *args, *extra, "--max-steps", "2", "--checkpoint-dir", str(ckpt_dir))
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (ckpt_dir / "metrics.jsonl").exists()
