"""The benchmarks run end to end and report what the checkpoint issue asks for (their figures
are judged by `make bench`, not here: timings on a shared machine are no test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_python
from trainer.checkpoint.layout import list_checkpoints

pytestmark = pytest.mark.torchrun

METHODS = ("torch_save", "dcp_save", "dcp_async_save", "fsdp_train")
TARGETS = ("blocking first / memcpy bound", "blocking warm / memcpy bound", "dcp.async_save warm / ours warm",
           "durable / fsync'd write bound", "reshard load / read bound", "snapshot warm / memcpy bound",
           "snapshot warm / training step")


def small_config(tmp_path: Path) -> Path:
    """The train and overhead benches' job at a size where a test takes seconds, not minutes (their
    default is ``make train``'s)."""
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"model": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4,
                                    "seq_len": 32, "global_batch_size": 8, "warmup_steps": 5,
                                    "max_grad_norm": 1.0}))
    return path


def test_checkpoint_bench_reports_every_method_bound_and_target(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "bench.json"
    proc = run_python("-m", "bench.checkpoint", "--state-gb", "0.01", "--repeats", "2",
                      "--work-dir", str(work), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for method in METHODS:
        row = results[method]
        assert all(row[key] > 0 for key in ("blocking_first_s", "blocking_warm_s", "durable_s")), (method, row)
        assert row["blocking_warm_s"] <= row["durable_s"], (method, row)
    assert all(results["bounds"][key] > 0 for key in ("memcpy_s", "disk_write_s", "disk_read_s"))
    assert results["load"]["reshard_2_to_3_s"] > 0
    assert all(seconds > 0 for seconds in results["memory_snapshot"].values())
    for target in TARGETS:
        assert target in proc.stdout, target
    # No method's outputs pile up: this project's older checkpoints went by retention, the
    # other methods' outputs and all but the last write-bound file after their samples.
    assert [info.step for info in list_checkpoints(work / "fsdp_train")] == [1003]
    assert sorted(path.name for path in work.iterdir() if path.name.startswith(("torch-", "dcp-", "async-"))) == []
    assert len(list(work.glob("bound-*.bin"))) == 2  # one per rank


def test_overhead_bench_reports_the_slowdown(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = run_python("-m", "bench.overhead", "--pairs", "1", "--config", str(small_config(tmp_path)),
                      "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pairs"] == 1 and set(result["block_seconds"]) == {"none", "every_10", "snapshots"}
    assert all(rate > 0 for rate in result["steps_per_s"].values())
    rates = result["steps_per_s"]
    for kind in ("every_10", "snapshots"):
        assert result["slowdown"][kind] == pytest.approx(1 - rates[kind] / rates["none"])
    assert "slowdown" in proc.stdout and "memory snapshot after every step" in proc.stdout


TINY_JOB = ["--", "--model", "transformer", "--vocab-size", "50", "--d-model", "24", "--n-layers", "2",
            "--n-heads", "4", "--seq-len", "12", "--global-batch-size", "8"]


def test_recovery_bench_breaks_each_recovery_down(tmp_path: Path) -> None:
    out = tmp_path / "recovery.json"
    proc = run_python("-m", "bench.recovery", "--repeats", "1", "--scenarios", "kill-one,term-job",
                      "--json", str(out), *TINY_JOB, "--checkpoint-every", "5", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"kill-one", "term-job"}
    assert all(set(modes) == {"cold", "warm"} for modes in results.values())
    assert results["kill-one"]["cold"]["restored_from"] == {"disk": 1}, "before: fresh interpreters, disk"
    assert results["kill-one"]["warm"]["restored_from"] == {"memory": 1}, "now: forked workers, memory"
    for scenario, summary in ((f"{scenario} {mode}", summary) for scenario, modes in results.items()
                              for mode, summary in modes.items()):
        parts = [summary[name]["median"] for name in ("detection_s", "stop_s", "restart_s")]
        assert all(part >= 0 for part in parts), (scenario, summary)
        assert sum(parts) == pytest.approx(summary["total_s"]["median"], abs=0.01), "the parts add up to the total"
        assert {"process_start", "restore", "first_step"} <= set(summary["phases_median"])
        assert scenario in proc.stdout
    assert all(summary["steps_lost"]["max"] == 0 for summary in results["term-job"].values()), \
        "an emergency checkpoint loses nothing"


def test_goodput_bench_reports_the_interval_table(tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"
    proc = run_python("-m", "bench.goodput", "--minutes", "0.2", "--kill-every", "6", "--intervals", "5",
                      "--checkpoint-every", "auto", "--modes", "warm", "--json", str(out), *TINY_JOB,
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["every"] for row in result["intervals"]] == ["5", "auto"]
    assert all(row["restored_from"] for row in result["rows"]), "each row says which tier its restarts used"
    assert 0 < result["goodput"] < 1 and result["failures"] >= 1
    assert len(result["recovery_s"]) >= 1 and all(seconds > 0 for seconds in result["recovery_s"])
    assert "auto" in proc.stdout and "best fixed" in proc.stdout


def test_train_bench_compares_our_step_with_a_plain_loop_and_the_loader(tmp_path: Path) -> None:
    from test_token_data import DOCS, write_texts

    from trainer.data.prepare import PrepareOptions, prepare

    data, out = tmp_path / "data", tmp_path / "train.json"
    prepare(PrepareOptions([str(write_texts(tmp_path / "src", DOCS * 4))], data, val_fraction=0.0))
    proc = run_python("-m", "bench.train", "--blocks", "2", "--block-steps", "2", "--worlds", "1",
                      "--precisions", "fp32,bf16", "--data", str(data), "--config", str(small_config(tmp_path)),
                      "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["world_size"], r["precision"]) for r in results["runs"]] == [(1, "fp32"), (1, "bf16")]
    for run in results["runs"]:
        rates = run["tokens_per_s"]
        assert rates["fsdp_train"] > 0 and rates["plain"] > 0
        assert run["ratio"] == pytest.approx(rates["fsdp_train"] / rates["plain"])
    assert results["loader"]["ratio"] == pytest.approx(
        results["loader"]["tokens_per_s"] / results["loader"]["fastest_step_tokens_per_s"])
    assert "ratio" in proc.stdout and "target >= 0.95" in proc.stdout and "target >= 50x" in proc.stdout
