"""Start torchrun: ``local`` (standalone, this machine) and ``launch`` (container entrypoint).

``local`` validates the config first so mistakes are one line, not a torchrun
traceback per worker; it restarts a failed worker group in place (``--max-restarts``),
turns Ctrl-C or SIGTERM into a clean stop (the workers write an emergency
checkpoint, or exit at once while still starting) and then exits 0.
``launch`` runs torchrun's agent in its own process, which reads its rendezvous settings
from ``PET_*`` environment variables (set by the Helm chart or the operator).
Both give torchrun a stop timeout that covers the emergency checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

from trainer.config import TrainConfig, config_to_args, is_hf
from trainer.launcher.agent import HOLD_FD_ENV, KEEP_ON_FAILURE_ENV

# Nothing up here imports torch: ``local`` starts its agent before it imports torch itself.

# What in-place restarts need from torchrun, set by ``local`` and ``launch`` unless the user set it.
# With the rendezvous store shared as the workers' store, a restarted group fails about half the
# time in init_process_group ("Gloo connectFullMesh failed ... Connection refused"), and a pod that
# joins a running job waits forever for the new round's MASTER_ADDR.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


# Seconds torchrun waits beyond ``shutdown_grace`` before it SIGKILLs workers that are still
# writing their emergency checkpoint (its own default is a fixed 30 s, whatever the grace).
# The Helm chart adds the same margin again for torchrun itself to exit before the pod's
# terminationGracePeriodSeconds runs out.
STOP_MARGIN_S = 5


def restart_safe(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with ``RESTART_ENV`` filled in where it has no value of its own."""
    return {**RESTART_ENV, **environ}


def stop_timeout(cfg: TrainConfig) -> int:
    """torchrun's ``--shutdown-timeout``: the emergency checkpoint's grace plus ``STOP_MARGIN_S``."""
    return math.ceil(cfg.shutdown_grace) + STOP_MARGIN_S


def torchrun_prefix(*extra: str) -> list[str]:
    """torchrun, through ``trainer.agent``: the same agent, with a one-line reason for each failure."""
    return [sys.executable, "-m", "trainer.launcher.agent", *extra]


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """The checks a worker would fail on, done once up front with a one-line message."""
    from pathlib import Path

    import torch

    from trainer.checkpoint.layout import committed_checkpoints, ensure_writable
    from trainer.checkpoint.lock import JobLock
    from trainer.checkpoint.marker import require_same_shape
    from trainer.data.loader import TrainingData, check_same_data
    from trainer.models.build import build_model, check_output
    from trainer.models.sharding import shard_units

    cfg.check_world_size(world_size)
    data = TrainingData(cfg)
    ensure_writable(cfg.checkpoint_dir)
    JobLock(Path(cfg.checkpoint_dir), run_id="", ttl=cfg.lock_ttl).refuse_if_held()
    if not cfg.no_resume and cfg.resume_from is None:
        committed = committed_checkpoints(cfg.checkpoint_dir)
        if committed:
            require_same_shape(committed[-1].path, committed[-1].marker, cfg.shape_fields())
            check_same_data(cfg, committed[-1].marker.dataset, data.info and data.info.fingerprint())
    with torch.device("meta"):  # shapes only: no memory, no init cost; a model that cannot be built fails here
        model = build_model(cfg)
    shard_units(model, cfg.shard_modules, cfg.model)
    if cfg.init_from:
        from trainer.models.init_weights import initial_state

        initial_state(model, cfg.init_from, hf_names=is_hf(cfg.model))
    check_output(model, cfg)  # last: it may move a small model off the meta device


def start_held_agent(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start torchrun's agent, held before its rendezvous until ``release_agent``: its imports and
    its forkserver's (torch, FSDP, DCP: seconds) overlap the preflight instead of following it.
    Closing the returned pipe end without a word ends the agent quietly (the preflight failed)."""
    hold, go = os.pipe()
    child = subprocess.Popen(command, env={**env, HOLD_FD_ENV: str(hold)}, pass_fds=(hold,))
    os.close(hold)
    return child, go


def release_agent(go: int) -> None:
    os.write(go, b"1")
    os.close(go)


def run_local(cfg: TrainConfig, nproc: int, max_restarts: int = 3) -> int:
    """torchrun ``--standalone`` with ``nproc`` workers, restarting the group in place (from the
    newest checkpoint) up to ``max_restarts`` times when a worker fails."""
    command = torchrun_prefix("--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                              f"--shutdown-timeout={stop_timeout(cfg)}", "-m", "trainer", "train",
                              *config_to_args(cfg))
    env = restart_safe({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    started = time.time()
    # Same process group as us: Ctrl-C at a terminal reaches torchrun and the workers directly, and
    # killing the group kills everything. A SIGINT or SIGTERM sent to this process alone (a supervisor,
    # `timeout -s INT`, an IDE's stop button) is forwarded to torchrun as SIGTERM: the same clean stop.
    child, go = start_held_agent(command, env)
    try:
        preflight(cfg, nproc)
    except BaseException:
        os.close(go)
        child.wait()
        raise
    release_agent(go)
    stopping = False

    def forward(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    code = child.wait()
    if stopping and code != 0:
        return stopped(cfg, started, code)
    return code


def stopped(cfg: TrainConfig, started: float, code: int) -> int:
    """The exit code of a ``local`` the user stopped: 0 when it stopped cleanly (its emergency
    checkpoint committed, or stopped before any step: nothing new to save), else the agent's."""
    from trainer.checkpoint.layout import committed_checkpoints
    from trainer.checkpoint.marker import SaveReason
    from trainer.metrics.records import read_metrics

    committed = committed_checkpoints(cfg.checkpoint_dir)
    newest = committed[-1].marker if committed else None
    if newest and newest.reason == SaveReason.PREEMPTED and newest.created >= started:
        print(f"fsdp-train: stopped; emergency checkpoint step {newest.step} committed", file=sys.stderr)
        return 0
    if not any(record.get("event") == "step" and record.get("time", 0) >= started
               for record in read_metrics(cfg.checkpoint_dir)):
        newest_step = f"step {newest.step}" if newest else "none yet"
        print(f"fsdp-train: stopped during start-up, before any step: nothing new to save "
              f"(newest checkpoint: {newest_step})", file=sys.stderr)
        return 0
    return code


def launch_command(cfg: TrainConfig, train_args: list[str], environ: dict[str, str],
                   nnodes: str | None = None) -> list[str]:
    """The torchrun command line of ``launch``; everything not given here comes from ``PET_*``.

    ``nnodes`` wins over ``PET_NNODES``: Kubeflow Trainer v2 overwrites that variable with the
    TrainJob's fixed ``numNodes``, and only torchrun's own flag keeps the elastic range.
    """
    options = [] if "PET_SHUTDOWN_TIMEOUT" in environ else [f"--shutdown-timeout={stop_timeout(cfg)}"]
    if nnodes:
        options.append(f"--nnodes={nnodes}")
    return torchrun_prefix(*options, "-m", "trainer", "train", *train_args)


def run_launch(cfg: TrainConfig, train_args: list[str], nnodes: str | None = None) -> int:
    """Run torchrun's agent in this process (PID 1 in the container: it receives SIGTERM directly),
    so a restarted container imports torch once, not once here and again in a new interpreter. A
    failed agent leaves its memory snapshots behind, for the container restarted in place (they live
    in the pod's memory volume, freed with the pod)."""
    from trainer.launcher import agent

    command = launch_command(cfg, train_args, dict(os.environ), nnodes)
    os.environ.update(restart_safe({**os.environ, KEEP_ON_FAILURE_ENV: "1"}))
    return agent.main(command[len(torchrun_prefix()):])
