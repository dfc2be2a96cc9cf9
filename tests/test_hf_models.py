"""transformers models are first-class: ``--model hf:CONFIG`` builds any causal LM architecture from
a local config (no download), a model whose forward returns ``.logits`` trains as it is, the
preflight runs a forward and checks the logits against the data in one line, and a run exports
back to a folder that ``from_pretrained`` loads with the same logits."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from test_bad_input import assert_one_line_error

from conftest import run_cli, start_records, step_records
from trainer.checkpoint.layout import step_dir
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.models.build import build_model, check_output, logits_of
from trainer.models.init_weights import check_matches, read_model_state, with_tied_names
from trainer.models.sharding import shard_units

VOCAB = 300  # the model's width: wider than the synthetic data's 256 ids
JOB = ["--seq-len", "16", "--global-batch-size", "6", "--checkpoint-every", "3", "--no-progress", "--lr", "1e-3"]


def write_configs(root: Path) -> dict[str, Path]:
    from transformers import GPT2Config, LlamaConfig

    configs = {
        "llama": LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        # dropout off: a resume at another world size then continues the same trajectory
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    }
    paths = {}
    for name, config in configs.items():
        config.save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def hf_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_configs(tmp_path_factory.mktemp("hf-configs"))


# ---- in-process: reading the output, the probe, where FSDP2 shards ------------------------------

def test_logits_are_read_from_a_tensor_an_output_object_a_mapping_and_a_tuple():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits = torch.randn(2, 3, 5)
    for output in (logits, CausalLMOutputWithPast(logits=logits), {"logits": logits}, (logits, None)):
        assert logits_of(output, "m:f") is logits
    with pytest.raises(UserError, match=r"--model m:f: its forward returned dict, which holds no logits"):
        logits_of({"hidden": logits}, "m:f")


def test_an_hf_model_is_built_from_a_config_file_or_folder_and_sharded_by_its_decoder_layers(hf_configs):
    for name, layer in (("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block")):
        for spec in (f"hf:{hf_configs[name]}", f"hf:{hf_configs[name] / 'config.json'}"):
            cfg = TrainConfig(model=spec, seq_len=16)
            with torch.device("meta"):
                model = build_model(cfg)
            units = shard_units(model, None, spec)
            assert [type(unit).__name__ for unit in units] == [layer, layer], spec
            check_output(model, cfg)  # meta cannot run it (its mask calls .item()): the CPU probe does
    assert_raises_one_line(TrainConfig(model=f"hf:{hf_configs['llama'] / 'missing'}"), "no config.json at")


def test_the_probe_names_the_models_width_and_the_datas_vocabulary(hf_configs):
    cfg = TrainConfig(model=f"hf:{hf_configs['gpt2']}", seq_len=16, vocab_size=1000)
    with torch.device("meta"):
        model = build_model(cfg)
    with pytest.raises(UserError, match=rf"has {VOCAB} logits per token, but the data's ids go up to 999 "
                                        r"\(vocabulary 1000\)"):
        check_output(model, cfg)


def assert_raises_one_line(cfg: TrainConfig, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        build_model(cfg)


# ---- end to end: two architectures train, reshard, infer and export -----------------------------

@pytest.mark.torchrun
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_an_hf_model_trains_resumes_resharded_is_inferred_and_exported(hf_configs, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.tools.inference import load_model

    ckpt, model = tmp_path / "ckpt", ["--model", f"hf:{hf_configs[name]}"]
    run_cli("local", "--nproc", "2", *model, *JOB, "--max-steps", "3", "--checkpoint-dir", str(ckpt), check=True)
    run_cli("local", "--nproc", "3", *model, *JOB, "--max-steps", "5", "--checkpoint-dir", str(ckpt), check=True)
    assert start_records(ckpt)[-1]["resumed_from"] == {"step": 3, "world_size": 2}
    losses = [record["loss"] for record in step_records(ckpt)]
    assert len(losses) == 5 and all(loss == loss for loss in losses), losses
    ids = json.loads(run_cli("infer", str(ckpt), "--input", "1 2 3", "--generate", "3", check=True).stdout)
    assert len(ids) == 3 and all(0 <= i < VOCAB for i in ids), ids

    out = tmp_path / "export"
    run_cli("export-hf", str(ckpt), str(out), check=True)
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, cfg = load_model(step_dir(ckpt, 5))
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        worst = (logits_of(ours(tokens), cfg.model) - exported(tokens).logits).abs().max().item()
    assert worst <= 1e-5, f"{name}: the export's logits differ by {worst:.2e}"
    # --init-from takes the export back under the model's own names (GPT-2 saves its tied head once)
    state = with_tied_names(ours, read_model_state(str(out), hf_names=True))
    check_matches(ours, state, str(out))
    assert all(torch.equal(state[key], value) for key, value in ours.state_dict().items())


PLUGIN = '''
from torch import nn


class Narrow(nn.Module):
    """Built for 500 ids."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(500, 8)
        self.out = nn.Linear(8, 500)

    def forward(self, tokens):
        return {"logits": self.out(self.emb(tokens))}


class Hidden(Narrow):
    def forward(self, tokens):
        return {"hidden": self.emb(tokens)}


def narrow():
    return Narrow()


def hidden():
    return Hidden()
'''


@pytest.mark.torchrun
def test_a_model_whose_output_is_not_logits_or_too_narrow_fails_in_the_preflight(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    common = ["--python-path", str(tmp_path), "--seq-len", "8", "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = run_cli("local", "--nproc", "2", "--model", "mine:narrow", "--vocab-size", "1000", *common)
    assert_one_line_error(proc, "--model mine:narrow: it has 500 logits per token", "vocabulary 1000")
    proc = run_cli("local", "--nproc", "2", "--model", "mine:hidden", *common)
    assert_one_line_error(proc, "--model mine:hidden: its forward returned dict, which holds no logits")
    assert not (tmp_path / "ckpt" / "metrics.jsonl").exists(), "refused before any worker started"
