"""export-hf: a checkpoint of the built-in transformer loads in transformers as LlamaForCausalLM with
the same logits, sharded safetensors carry an index, the dataset's tokenizer comes along, and
--init-from takes the folder back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_token_data import DOCS, write_texts

from conftest import run_cli
from trainer.checkpoint.layout import step_dir
from trainer.checkpoint.reader import read_tensors
from trainer.data.prepare import PrepareOptions, prepare
from trainer.tools.inference import load_model

pytestmark = pytest.mark.torchrun

LM = ["--model", "transformer", "--vocab-size", "300", "--d-model", "32", "--n-layers", "2", "--n-heads", "4",
      "--seq-len", "16", "--ffn-mult", "2", "--global-batch-size", "8", "--checkpoint-every", "4", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    prepare(PrepareOptions([str(write_texts(root / "src", DOCS * 3))], root / "data", train_tokenizer=300,
                           val_fraction=0.0))
    run_cli("local", "--nproc", "2", *LM, "--data", str(root / "data"), "--max-steps", "4", "--checkpoint-dir",
            str(root / "ckpt"), check=True)
    return step_dir(root / "ckpt", 4)


def test_the_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = run_cli("export-hf", str(trained), str(out), "--max-shard-bytes", "40000", check=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / name).is_file() for name in files), proc.stdout
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["eos_token_id"] >= 0
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ours, cfg = load_model(trained)
    tokens = torch.randint(cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(tokens), hf(tokens).logits
    worst = (expected - got).abs().max().item()
    print(f"\nexport-hf: transformers LlamaForCausalLM vs fsdp-train logits, max |diff| {worst:.2e} (fp32)")
    assert worst <= 1e-4
    assert_tokenizer_round_trips(out, cfg)


def assert_tokenizer_round_trips(folder: Path, cfg) -> None:
    """AutoTokenizer reads the export: text -> ids (the dataset's own) -> text, with EOS set."""
    from transformers import AutoTokenizer

    from trainer.data.dataset import open_dataset
    from trainer.data.tokenizer import dataset_tokenizer

    info = open_dataset(cfg.data)
    ours, theirs = dataset_tokenizer(info.directory, info.tokenizer), AutoTokenizer.from_pretrained(str(folder))
    text = "def f(x):\n    return x * 3  # héllo, wörld \u20ac"
    ids = theirs.encode(text, add_special_tokens=False)
    assert ids == ours.encode_batch([text])[0].tolist() and theirs.decode(ids) == text
    assert theirs.eos_token_id == info.eos_id and theirs.eos_token is not None


def test_a_byte_tokenized_run_exports_its_tokenizer_too(tmp_path):
    from trainer.config import TrainConfig
    from trainer.tools.hf_export import copy_tokenizer

    prepare(PrepareOptions([str(write_texts(tmp_path / "src", DOCS))], tmp_path / "bytes", val_fraction=0.0))
    cfg = TrainConfig(model="transformer", data=str(tmp_path / "bytes"))
    (tmp_path / "out").mkdir()
    assert copy_tokenizer(cfg, tmp_path / "out") == 256
    assert_tokenizer_round_trips(tmp_path / "out", cfg)


def test_init_from_takes_the_exported_folder(trained, tmp_path):
    out, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    run_cli("export-hf", str(trained), str(out), check=True)
    assert not (out / "model.safetensors.index.json").exists() or len(list(out.glob("*.safetensors"))) == 1
    run_cli("local", "--nproc", "2", *LM, "--init-from", str(out), "--max-steps", "0", "--checkpoint-dir", str(ckpt),
            check=True)
    started, exported = read_tensors(step_dir(ckpt, 0), "app.model."), read_tensors(trained, "app.model.")
    assert started.keys() == exported.keys()
    assert all(torch.equal(started[k], exported[k]) for k in started)
    bf16 = tmp_path / "bf16"
    run_cli("export-hf", str(trained), str(bf16), "--dtype", "bf16", check=True)
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    proc = run_cli("export-hf", str(trained), str(bf16))
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
