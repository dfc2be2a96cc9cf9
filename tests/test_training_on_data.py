"""Training on a prepared real-text dataset: resharded resumes across epoch boundaries with
micro-batches and clipping stay on the uninterrupted trajectory, micro-batches give the same
update as more ranks, held-out loss is recorded, other data is refused on resume, and the
checkpoint continues a text prompt.

Tolerance: as tests/test_equivalence.py, ATOL 1e-5 against reduction-order differences, scaled by
the value's magnitude where it is above 1 (``|a - b| <= ATOL * max(1, |b|)``): byte-token embedding
rows start at N(0, 1) and reach 4, and Adam turns the round-off of a rare token's near-zero
gradient into tens of ulps there (one rank with 4 micro-batches against 4 ranks: 1.7e-5 absolute
on a value of 4.2, 4e-6 relative). Micro-batches only regroup the same per-sample sums.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from test_equivalence import ATOL

from conftest import error_lines, run_cli, start_records, step_records
from trainer.checkpoint.reader import read_tensors
from trainer.data.prepare import PrepareOptions, prepare
from trainer.metrics.records import read_metrics

pytestmark = pytest.mark.torchrun

STEPS = 24
DOC_CHARS, DOCS = 200, 8  # 6 training documents (~75 windows of 16 tokens: 240 samples cross 3 epochs), 2 held out
LM = ["--model", "transformer", "--vocab-size", "260", "--d-model", "24", "--n-layers", "2", "--n-heads", "4",
      "--seq-len", "16", "--ffn-mult", "2", "--global-batch-size", "10", "--checkpoint-every", "4",
      "--decay-steps", str(STEPS), "--warmup-steps", "4", "--lr", "0.01", "--no-progress"]
FEATURES = ["--micro-batch-size", "3", "--max-grad-norm", "1.0", "--eval-every", "8", "--eval-batches", "2",
            "--tensorboard"]


def stdlib_documents(count: int, chars: int) -> list[str]:
    """The first ``chars`` characters of the standard library's first ``count`` source files."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-z]*.py"))[:count]
    docs = [path.read_text(encoding="utf-8", errors="replace")[:chars] for path in paths]
    assert len(docs) == count and all(len(doc) == chars for doc in docs), "too little standard library source"
    return docs


def make_dataset(folder: Path, chars: int = DOC_CHARS) -> Path:
    src = folder / "src"
    src.mkdir(parents=True)
    for i, doc in enumerate(stdlib_documents(DOCS, chars)):
        (src / f"{i:03d}.py").write_text(doc)
    prepare(PrepareOptions([str(src)], folder / "data", val_fraction=0.25))
    return folder / "data"


def train(ckpt: Path, data: Path, segments: list[tuple[int, int]], *extra: str) -> None:
    for nproc, until in segments:
        run_cli("local", "--nproc", str(nproc), *LM, "--data", str(data), *extra, "--max-steps", str(until),
                "--checkpoint-dir", str(ckpt), check=True)


def final_state_diff(a: Path, b: Path) -> float:
    """The largest difference of any parameter or optimizer value, relative where the value exceeds 1."""
    left, right = (read_tensors(ckpt / f"step-{STEPS:08d}", "app.") for ckpt in (a, b))
    assert left.keys() == right.keys()
    return max(((left[k] - right[k]).abs() / right[k].abs().clamp(min=1.0)).max().item() for k in left)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("text-run") / "uninterrupted"
    train(ckpt, dataset, [(2, STEPS)], *FEATURES)
    return ckpt


def test_resharded_resumes_across_epochs_with_micro_batches_match(uninterrupted, dataset, tmp_path):
    steps = step_records(uninterrupted)
    assert steps[-1]["epoch"] >= 2, "the run must cross epoch boundaries"
    assert steps[-1]["tokens_seen"] == STEPS * 10 * 16 and all("grad_norm" in s for s in steps)
    resumed = tmp_path / "resumed"
    train(resumed, dataset, [(2, 8), (3, 16), (1, STEPS)], *FEATURES)
    worst = final_state_diff(uninterrupted, resumed)
    ref, got = steps[-1]["loss"], step_records(resumed)[-1]["loss"]
    print(f"\ntext data 2->3->1 (micro-batch 3, clip 1.0, epochs 0-{steps[-1]['epoch']}) vs uninterrupted: final loss "
          f"{ref:.8f} vs {got:.8f}; max scaled |param or optimizer diff| {worst:.2e}; tolerance {ATOL:.0e}")
    assert abs(ref - got) <= ATOL and worst <= ATOL
    evals = [r for r in read_metrics(resumed) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24]
    ref_evals = [r["loss"] for r in read_metrics(uninterrupted) if r["event"] == "eval"]
    assert max(abs(a - r["loss"]) for a, r in zip(ref_evals, evals)) <= ATOL
    check_tensorboard(resumed)


def check_tensorboard(ckpt: Path) -> None:
    """The event files hold every logged scalar by step, and each resume as a text event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "job/world_size",
            "eval/loss"} <= set(tags["scalars"])
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert losses.keys() == set(range(1, STEPS + 1))
    assert abs(losses[STEPS] - step_records(ckpt)[-1]["loss"]) < 1e-6
    assert [e.step for e in events.Scalars("eval/loss")] == [8, 16, 24]
    assert sorted({e.value for e in events.Scalars("job/world_size")}) == [1.0, 2.0, 3.0]
    resumes = sorted((e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("resumes/text_summary"))
    assert [step for step, _ in resumes] == [8, 16]
    assert "resumed at step 8" in resumes[0][1] and "world 2 -> 3" in resumes[0][1]


def test_one_rank_with_four_micro_batches_matches_four_ranks(dataset, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    train(one, dataset, [(1, STEPS)], "--micro-batch-size", "3")  # 3 + 3 + 3 + 1 samples
    train(four, dataset, [(4, STEPS)])  # 3 / 3 / 2 / 2 samples per rank
    worst = final_state_diff(one, four)
    print(f"\nworld 1 x 4 micro-batches vs world 4: max scaled |param or optimizer diff| {worst:.2e}")
    assert worst <= ATOL


def test_a_resume_on_other_data_is_refused_unless_allowed(uninterrupted, tmp_path):
    ckpt, other = tmp_path / "ckpt", make_dataset(tmp_path / "other", chars=DOC_CHARS + 40)
    import shutil

    shutil.copytree(uninterrupted, ckpt)
    proc = run_cli("local", "--nproc", "1", *LM, "--data", str(other), "--max-steps", str(STEPS + 2),
                   "--checkpoint-dir", str(ckpt))
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "trained on another dataset" in lines[0] and "--allow-data-change" in lines[0]
    assert step_records(ckpt)[-1]["step"] == STEPS, "nothing trained, nothing written"
    run_cli("local", "--nproc", "1", *LM, "--data", str(other), "--max-steps", str(STEPS + 2), "--allow-data-change",
            "--checkpoint-dir", str(ckpt), check=True)
    assert start_records(ckpt)[-1]["step"] == STEPS and step_records(ckpt)[-1]["step"] == STEPS + 2


def test_infer_continues_a_text_prompt(uninterrupted):
    proc = run_cli("infer", str(uninterrupted / f"step-{STEPS:08d}"), "--prompt", "def ", "--generate", "20",
                   check=True)
    assert proc.stdout.startswith("def ") and len(proc.stdout.rstrip("\n")) > len("def ")
    proc = run_cli("infer", str(uninterrupted / f"step-{STEPS:08d}"), "--prompt", "x", "--tokenizer", "nope.json")
    assert proc.returncode == 2 and "--tokenizer nope.json: no such file" in proc.stderr


def test_status_and_plot_show_the_held_out_loss(uninterrupted, tmp_path):
    out = run_cli("status", str(uninterrupted), check=True).stdout
    evals = [r for r in read_metrics(uninterrupted) if r["event"] == "eval"]
    last = step_records(uninterrupted)[-1]
    assert f"held-out loss {evals[-1]['loss']:.5f} at step {STEPS}" in out
    assert f"epoch {last['epoch']}, {last['tokens_seen']:,} tokens" in out
    from matplotlib import image

    png = tmp_path / "loss.png"
    run_cli("plot", str(uninterrupted), "-o", str(png), check=True)
    assert image.imread(png).shape[:2] == (500, 1000)
