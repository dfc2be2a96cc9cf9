"""Checkpoint benchmark: this project's save against torch.save, dcp.save and dcp.async_save.

Run ``python -m bench.checkpoint [--state-gb 1.5] [--json FILE]``. It starts two torchrun
phases on this machine: 2 ranks save the same FSDP2 model + AdamW state with every method
(a first save, then warm saves in rounds with the fsync'd disk-write bound), take the memory
tier's snapshot and a training step in the same rounds, and measure the memory-copy bound;
then 3 ranks alternate the disk-read bound and the resharding load (2 -> 3) of the checkpoint
this project wrote. Page caches are dropped before each read when allowed.
Every figure comes from the same run, so ratios between them are meaningful.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("torch_save", "dcp_save", "dcp_async_save", "fsdp_train")
OUTPUT_PREFIX = {"torch_save": "torch-", "dcp_save": "dcp-", "dcp_async_save": "async-"}  # removed after each sample


# ---- helpers shared by the phases (run inside torchrun workers) ------------------------------
def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _bench_config(state_gb: float, checkpoint_dir: Path):
    from trainer.config import TrainConfig

    # AdamW keeps two moments per parameter: state bytes ~ 12 x params (fp32). Width 1024,
    # 12 * d^2 parameters per block.
    d_model = 1024
    layers = max(1, round(state_gb * 1e9 / 12 / (12 * d_model * d_model)))
    # keep_last=1: retention deletes the previous checkpoint after each commit, as the write bound's
    # previous file and the other methods' outputs are deleted after their samples. On a virtual disk,
    # writes got 3-4x slower once a few GB of new files had piled up: that times the disk, not the method.
    return TrainConfig(model="transformer", vocab_size=256, d_model=d_model, n_layers=layers, n_heads=8,
                       seq_len=8, global_batch_size=6, max_steps=10**6, checkpoint_dir=str(checkpoint_dir),
                       checkpoint_every=10**6, keep_last=1, lock_ttl=3600.0)


def _local_state_bytes(state: dict) -> int:
    import torch
    from torch.distributed.tensor import DTensor

    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _local_state_bytes(value)
        elif isinstance(value, DTensor):
            total += value.to_local().numel() * value.element_size()
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def _max_over_ranks(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    box = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def _write_durably(path: Path, payload: bytes) -> None:
    with open(path, "wb") as out:
        out.write(payload)
        out.flush()
        os.fsync(out.fileno())


def _timed(action) -> float:
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    action()
    dist.barrier()
    return time.perf_counter() - started


# ---- phase 1: saves and write/copy bounds (2 ranks) -------------------------------------------
def phase_save(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from trainer.checkpoint.app_state import STATE_KEY
    from trainer.checkpoint.layout import step_dir
    from trainer.checkpoint.marker import SaveReason
    from trainer.checkpoint.snapshot import SnapshotSlots
    from trainer.train import Trainer

    work = Path(args.work)
    trainer = Trainer(_bench_config(args.state_gb, work / "fsdp_train"))
    trainer.setup()
    trainer.train_step()
    trainer.checkpoints.settle()  # the writer processes start on the save thread: time saves, not start-up
    rank, group = trainer.rt.rank, trainer.rt.checkpoint_group
    state = {STATE_KEY: trainer.app_state}
    local_bytes = _local_state_bytes(trainer.app_state.state_dict())
    total = torch.tensor([local_bytes], dtype=torch.int64)
    dist.all_reduce(total)
    results: dict = {"state_bytes": int(total.item()), "world_size": trainer.rt.world_size}

    def output(name: str, tag: str) -> Path:
        return work / f"{OUTPUT_PREFIX[name]}{tag}"

    def torch_save(tag: str) -> tuple[float, float]:
        def save() -> None:
            model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer,
                                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                with open(output("torch_save", tag), "wb") as out:
                    torch.save({"model": model_sd, "optim": optim_sd}, out)
                    out.flush()
                    os.fsync(out.fileno())
        seconds = _timed(save)
        return seconds, seconds

    def dcp_save(tag: str) -> tuple[float, float]:
        seconds = _timed(lambda: dcp.save(state, checkpoint_id=output("dcp_save", tag), process_group=group))
        return seconds, seconds

    def dcp_async_save(tag: str) -> tuple[float, float]:
        dist.barrier()
        started = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=output("dcp_async_save", tag), process_group=group)
        blocking = time.perf_counter() - started
        future.result()
        dist.barrier()
        return blocking, time.perf_counter() - started

    def fsdp_train(tag: str) -> tuple[float, float]:
        step = 1001 if tag == "first" else 1002 + int(tag.removeprefix("warm"))
        dist.barrier()
        started = time.perf_counter()
        trainer.checkpoints.save(step, None, SaveReason.PERIODIC, blocking=False)
        blocking = time.perf_counter() - started
        trainer.checkpoints.wait()
        dist.barrier()
        durable = time.perf_counter() - started
        trainer.checkpoints.settle()  # retention deletes the previous checkpoint before the next sample starts
        return blocking, durable

    # Bounds, measured with the same per-rank byte count and parallelism as the saves.
    elements = local_bytes // 4
    source = torch.rand(elements)
    target = torch.empty_like(source)
    target.zero_()  # touch every page first: the bound is bandwidth, not page faults
    copy_seconds = min(_timed(lambda: target.copy_(source)) for _ in range(3))
    payload = source.numpy().tobytes()
    samples = itertools.count()

    def write_bound() -> float:
        # A new file each time, as checkpoints are: rewriting one file in place reuses its
        # just-freed page-cache pages and reads faster than any checkpoint can. The previous
        # file is deleted after the timing, as retention deletes checkpoints after the commit.
        previous = sorted(work.glob(f"bound-{rank}-*.bin"))
        seconds = _timed(lambda: _write_durably(work / f"bound-{rank}-{next(samples):06d}.bin", payload))
        for path in previous:
            path.unlink()
        return seconds

    # This disk's fsync'd throughput drifts by 2-3x within a run, so the methods take turns:
    # every round samples the write bound and then one warm save of each method, and each
    # figure is the best over the rounds. A drift then hits every method alike.
    methods = [("fsdp_train", fsdp_train), ("dcp_async_save", dcp_async_save), ("dcp_save", dcp_save),
               ("torch_save", torch_save)]
    if args.order == "reverse":
        methods.reverse()

    def sample(name: str, method, tag: str) -> tuple[float, float]:
        blocking, durable = (_max_over_ranks(v) for v in method(tag))
        if rank == 0 and name != "fsdp_train":
            for leftover in work.glob(f"{OUTPUT_PREFIX[name]}*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        dist.barrier()
        return blocking, durable

    # The memory tier: one rank's snapshot into its shared-memory slots (what every step pays with
    # --snapshot-every 1), and one training step, to put that stall in proportion.
    slots = SnapshotSlots(Path(args.snapshots), rank)

    def snapshot() -> float:
        return _max_over_ranks(_timed(lambda: slots.take(trainer.app_state.state_dict(), step=trainer.progress.step,
                                                         world_size=trainer.rt.world_size, run_id="bench",
                                                         config_digest="bench")))

    first = {name: sample(name, method, "first") for name, method in methods}
    snapshot_first = snapshot()
    warm: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in methods}
    write_seconds, snapshot_seconds, step_seconds = [], [], []
    for round_index in range(args.repeats):
        write_seconds.append(_max_over_ranks(write_bound()))
        snapshot_seconds.append(snapshot())
        step_seconds.append(_max_over_ranks(_timed(trainer.train_step)))
        for name, method in methods:
            if name != "torch_save" or round_index == 0:  # seconds per sample; one warm sample is enough
                warm[name].append(sample(name, method, f"warm{round_index}"))
    for name, _ in methods:
        results[name] = {
            "blocking_first_s": first[name][0], "durable_first_s": first[name][1],
            "blocking_warm_s": min(block for block, _ in warm[name]),
            "durable_s": min(durable for _, durable in warm[name]),
        }
    results["bounds"] = {"memcpy_s": _max_over_ranks(copy_seconds), "disk_write_s": min(write_seconds)}
    results["memory_snapshot"] = {"first_s": snapshot_first, "warm_s": min(snapshot_seconds),
                                  "step_s": min(step_seconds)}
    slots.drop()
    results["fsdp_train_checkpoint"] = str(step_dir(work / "fsdp_train", 1002 + args.repeats - 1))
    results["repeats"] = args.repeats
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    trainer.close()


# ---- phase 2: read bound and resharding load (3 ranks) ----------------------------------------
def phase_load(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from trainer.train import Trainer

    work = Path(args.work)
    cfg = _bench_config(args.state_gb, work / "fsdp_train")
    cfg.resume_from = args.checkpoint
    cfg.checkpoint_mode = "sync"  # this phase only loads: no staging memory or writer processes to start
    trainer = Trainer(cfg)
    dist.init_process_group("gloo")  # first, to time the read bound; setup() then joins this group
    rank, world = dist.get_rank(), dist.get_world_size()
    bound_files = sorted(work.glob("bound-*.bin"))
    sizes = [f.stat().st_size for f in bound_files]
    total = sum(sizes)
    share = (total + world - 1) // world

    def read_share() -> None:  # each rank reads 1/world of the bytes, like the load does
        offset, remaining = rank * share, min(share, max(0, total - rank * share))
        for path, size in zip(bound_files, sizes):
            if remaining <= 0:
                break
            if offset >= size:
                offset -= size
                continue
            with open(path, "rb") as src:
                src.seek(offset)
                chunk = min(remaining, size - offset)
                while chunk > 0:
                    data = src.read(min(chunk, 64 << 20))
                    chunk -= len(data)
                    remaining -= len(data)
            offset = 0

    def cold(action) -> float:
        if rank == 0:
            _drop_caches()
        return _max_over_ranks(_timed(action))

    dropped = _drop_caches() if rank == 0 else True
    read_seconds, load_seconds = [], []
    # This disk's read throughput drifts within a run too, so bound and load samples alternate.
    for round_index in range(args.repeats):
        read_seconds.append(cold(read_share))
        # The first load is setup's: it builds the model, then verifies and loads the checkpoint.
        if round_index == 0:
            cold(trainer.setup)
            resumed = trainer.checkpoints.resumed
        else:
            resumed = _resume_cold(trainer, cold)
        load_seconds.append(_max_over_ranks(resumed.seconds))
    result = {"disk_read_s": min(read_seconds), "reshard_2_to_3_s": min(load_seconds),
              "page_cache_dropped": dropped}
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    trainer.close()


def _resume_cold(trainer, cold):  # a Trainer, and the phase's cold-cache timer
    """Load the checkpoint again, from a cold page cache, as a resume does."""
    from trainer.checkpoint.resume import resume

    loads: list = []
    cold(lambda: loads.append(resume(trainer.checkpoints.settings, trainer.rt, trainer.app_state,
                                     trainer.cfg.shape_fields())))
    return loads[0]


# ---- driver ------------------------------------------------------------------------------------
def _torchrun(nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bench.checkpoint", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)


def report(results: dict) -> str:
    bounds, gib = results["bounds"], results["state_bytes"] / 2**30
    lines = [f"checkpoint benchmark: {gib:.2f} GiB of model + optimizer state, {results['world_size']} ranks, "
             f"best of {results['repeats']} (warm saves, loads, bounds)",
             f"{'method':16} {'blocking first':>15} {'blocking warm':>14} {'durable':>9}"]
    for name in METHODS:
        row = results[name]
        lines.append(f"{name:16} {row['blocking_first_s']:>14.3f}s {row['blocking_warm_s']:>13.3f}s "
                     f"{row['durable_s']:>8.3f}s")
    ours, async_dcp = results["fsdp_train"], results["dcp_async_save"]
    load, snapshot = results["load"], results["memory_snapshot"]
    lines += [
        f"memory snapshot (shared memory, every rank): first {snapshot['first_s']:.3f}s, warm "
        f"{snapshot['warm_s']:.3f}s; one training step {snapshot['step_s']:.3f}s",
        f"bounds: memcpy {bounds['memcpy_s']:.3f}s, fsync'd write {bounds['disk_write_s']:.3f}s, "
        f"read {bounds['disk_read_s']:.3f}s (page cache dropped: {load['page_cache_dropped']})",
        f"resharding load 2 -> 3 ranks: {load['reshard_2_to_3_s']:.3f}s (dcp.load with checksum verification)",
        "targets (ratios from this run):",
        f"  blocking first / memcpy bound   = {ours['blocking_first_s'] / bounds['memcpy_s']:.2f}  (<= 2)",
        f"  blocking warm / memcpy bound    = {ours['blocking_warm_s'] / bounds['memcpy_s']:.2f}  (<= 2)",
        f"  dcp.async_save warm / ours warm = {async_dcp['blocking_warm_s'] / ours['blocking_warm_s']:.1f}  (>= 4)",
        f"  durable / fsync'd write bound   = {ours['durable_s'] / bounds['disk_write_s']:.2f}  (<= 1.25)",
        f"  reshard load / read bound       = {load['reshard_2_to_3_s'] / bounds['disk_read_s']:.2f}  (<= 1.5)",
        f"  snapshot warm / memcpy bound    = {snapshot['warm_s'] / bounds['memcpy_s']:.2f}  (<= 1.25)",
        f"  snapshot warm / training step   = {snapshot['warm_s'] / snapshot['step_s']:.2f}  (a snapshot every "
        "step at this size; bench.overhead measures it at `make train` size, target <= 0.02)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--state-gb", type=float, default=1.5, help="model + optimizer state size (default 1.5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--repeats", type=int, default=5,
                        help="warm saves, loads and bound samples; best is kept (default 5)")
    parser.add_argument("--work-dir", help="where checkpoints are written (default: a temp dir, removed after)")
    parser.add_argument("--order", choices=("ours-first", "reverse"), default="ours-first",
                        help="order of the methods (page-cache state drifts as a run writes)")
    parser.add_argument("--phase", choices=("save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "save":
        phase_save(args)
        return 0
    if args.phase == "load":
        phase_load(args)
        return 0

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fsdp-train-bench-", dir="."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        saved, loaded = work / "save.json", work / "load.json"
        common = ["--work", str(work), "--state-gb", str(args.state_gb), "--repeats", str(args.repeats),
                  "--order", args.order]
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # where the memory tier keeps its snapshots
        with tempfile.TemporaryDirectory(prefix="fsdp-train-bench-", dir=shm) as snapshots:
            _torchrun(2, "--phase", "save", "--out", str(saved), "--snapshots", snapshots, *common)
        results = json.loads(saved.read_text())
        _torchrun(3, "--phase", "load", "--out", str(loaded), *common,
                  "--checkpoint", results.pop("fsdp_train_checkpoint"))
        load = json.loads(loaded.read_text())
        results["bounds"]["disk_read_s"] = load.pop("disk_read_s")
        results["load"] = load
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
