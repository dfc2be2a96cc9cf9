"""trainer.launcher.agent: torchrun's agent with one line per failure, and the failure handed to the next workers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, _env, wait_for
from trainer.distributed.failure_file import FAILURE_FILE_ENV, read_failure
from trainer.launcher.agent import (
    AGENT_LOGGER,
    HOLD_FD_ENV,
    FailureRecorder,
    RunFolder,
    give_up_reason,
    install_fast_stop,
    is_stopped,
    job_entrypoint,
    kill_stopped_workers,
    runs_the_trainer,
    stopped_peers_killed_first,
)
from trainer.metrics.phases import what_it_recovered_from


def test_the_agents_failure_record_reaches_the_next_start(tmp_path, capsys):
    run = RunFolder()
    path = run.failure_file = tmp_path / "failure.json"
    logger = logging.getLogger(AGENT_LOGGER)
    recorder = FailureRecorder(run)
    logger.addHandler(recorder)
    try:  # what torch.distributed.elastic logs when a worker group fails
        logger.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", -9, 1, 4242, "python")
    finally:
        logger.removeHandler(recorder)
    assert "worker local_rank 1 failed (signal SIGKILL)" in capsys.readouterr().err
    failure = read_failure({FAILURE_FILE_ENV: str(path)})
    assert (failure["exit_code"], failure["signal"], failure["local_rank"]) == (-9, "SIGKILL", 1)
    earlier = [{"event": "start", "time": 1.0}, {"event": "step", "step": 7, "time": failure["time"] - 1}]
    found = what_it_recovered_from(5, "periodic", 2, 2, earlier, failure)
    assert (found["cause"], found["signal"], found["exit_code"], found["steps_lost"]) == ("failure", "SIGKILL", -9, 2)
    survivor = [*earlier, {"event": "step", "step": 8, "time": failure["time"] + 0.01}]
    assert what_it_recovered_from(5, "periodic", 2, 2, survivor, failure)["signal"] == "SIGKILL", \
        "a step a survivor logged just after the failure does not hide it"
    stale = [*earlier, {"event": "start", "time": failure["time"] + 5}, {"event": "step", "step": 9}]
    assert "signal" not in what_it_recovered_from(5, "periodic", 2, 2, stale, failure), "an older failure"


@pytest.fixture
def stopped_and_running():
    """Two stand-in workers: one SIGSTOPped (a hang), one running."""
    stopped, running = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2))
    try:
        stopped.send_signal(signal.SIGSTOP)
        wait_for(lambda: is_stopped(stopped.pid), 10, "the worker to stop")
        yield stopped, running
    finally:
        for proc in (stopped, running):
            proc.kill()
            proc.wait()


def test_a_stopped_worker_is_killed_at_once_and_a_running_one_is_left_to_sigterm(stopped_and_running, capsys):
    stopped, running = stopped_and_running
    assert not is_stopped(running.pid)
    assert kill_stopped_workers({0: running.pid, 1: stopped.pid}) == [1]
    assert stopped.wait(timeout=10) == -signal.SIGKILL
    assert running.poll() is None, "a running worker gets torchrun's SIGTERM and its grace"
    assert "worker local_rank 1 (pid" in capsys.readouterr().err


def test_the_agent_stops_a_worker_group_through_the_fast_stop():
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.multiprocessing.spawn import ProcessContext

    from trainer.launcher.torch_compat import MARK

    install_fast_stop()
    install_fast_stop()  # idempotent: one wrapper, not two
    assert PContext.close.kills_stopped_workers
    assert not getattr(PContext.close.__wrapped__, "kills_stopped_workers", False)
    join_all = ProcessContext._join_procs_with_timeout
    assert getattr(join_all, MARK) and not getattr(join_all.__wrapped__, MARK, False)


def test_after_a_forked_worker_failed_a_stopped_peer_is_killed_before_torchs_30_s_wait(stopped_and_running, capsys):
    from types import SimpleNamespace

    stopped, running = stopped_and_running
    waited = []
    group = SimpleNamespace(pids=lambda: [running.pid, stopped.pid],  # torch's ProcessContext, as join sees it
                            processes=[SimpleNamespace(exitcode=None), SimpleNamespace(exitcode=None)])
    stopped_peers_killed_first(lambda context, timeout: waited.append(timeout))(group, 30)
    assert stopped.wait(timeout=10) == -signal.SIGKILL and waited == [30]
    assert running.poll() is None, "a running worker still gets torch's SIGTERM and its grace"
    assert "worker local_rank 1 (pid" in capsys.readouterr().err


def test_trainer_workers_start_warm_from_a_forkserver_in_their_runs_folder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from trainer.checkpoint.snapshot import FOLDER_ENV, ROOT_ENV, snapshot_folder
    from trainer.launcher import worker

    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "shm"))
    monkeypatch.delenv("FSDP_TRAIN_RUN_ID", raising=False)
    for name in (FOLDER_ENV, FAILURE_FILE_ENV):  # the run sets them for its workers; restored after the test
        monkeypatch.setenv(name, "")
    stale = snapshot_folder(tmp_path / "ckpt", "run-before", str(tmp_path / "shm"))
    stale.mkdir(parents=True)

    def torchruns(args):  # what torch.distributed.run.config_from_args returns for `-m MODULE ARGS`
        return SimpleNamespace(start_method="spawn", run_id="run-now"), sys.executable, ["-u", "-m", *args.rest]

    train = ["train", "--checkpoint-dir", str(tmp_path / "ckpt")]
    args = SimpleNamespace(module=True, training_script="trainer", no_python=False, training_script_args=train,
                           rest=["trainer", *train])
    started = []  # the forkserver itself would import torch & co. in the background: recorded instead
    monkeypatch.setattr(worker, "start_forkserver", lambda: started.append(True))
    run = RunFolder()
    config, entry, (env, *entry_args) = job_entrypoint(torchruns, run, warm=True)(args)
    assert (config.start_method, entry, entry_args) == ("forkserver", worker.run, train)
    assert started, "the forkserver runs before the rendezvous, not after it"
    assert env == {FOLDER_ENV: str(run.path), FAILURE_FILE_ENV: str(run.path / "failure.json")}, \
        "the run's folder reaches workers forked from a forkserver started before it was known"
    assert run.path == snapshot_folder(tmp_path / "ckpt", "run-now", str(tmp_path / "shm")) and run.path.is_dir()
    assert os.environ[FOLDER_ENV] == str(run.path) and not stale.exists(), "another run's folder is reclaimed"
    config, entry, _ = job_entrypoint(torchruns, RunFolder(), warm=False)(args)
    assert (config.start_method, entry) == ("spawn", sys.executable), "cold: a fresh interpreter per worker"
    other = SimpleNamespace(**{**vars(args), "training_script": "mypkg", "rest": ["mypkg"]})
    assert job_entrypoint(torchruns, RunFolder(), warm=True)(other)[1] == sys.executable, "only the trainer"
    run.close(failed=False)
    assert not run.path.exists() and not run.path.parent.exists(), "freed at the end"


def test_the_forkserver_starts_early_only_for_the_trainer():
    assert runs_the_trainer(["--standalone", "--nproc-per-node=2", "-m", "trainer", "train", "--lr", "1"])
    assert runs_the_trainer(["--module", "trainer", "train"])
    assert not runs_the_trainer(["--standalone", "-m", "mypkg.train", "trainer"])
    assert not runs_the_trainer(["--standalone", "script.py", "-m", "x"])


def test_the_forkserver_ends_without_the_interpreters_teardown():
    """It holds the job's output open until it ends: a teardown of the torch it preloaded would keep a
    caller that reads that output to its end waiting most of a second after every job."""
    from trainer.launcher.worker import PRELOAD

    assert "trainer.launcher.forkserver_exit" in PRELOAD
    code = ("import atexit; atexit.register(print, 'teardown ran', flush=True)\n"  # would run after ours
            "import trainer.launcher.forkserver_exit\nprint('served', flush=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "served\n"), proc


def test_a_failed_worker_waits_for_the_agent_only_until_the_agents_sigterm():
    """The wait that lets the agent see a dead peer first ends when the agent stops this worker."""
    code = ("from trainer.distributed.preemption import StopRequest\n"
            "from trainer.launcher import worker\n"
            "StopRequest().install()  # as in training\n"
            "worker.ROOT_CAUSE_FIRST_S = 600\n"
            "print('failed', flush=True)\n"
            "worker.let_the_agent_see_the_cause_first()\n"
            "print('ends', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    assert proc.stdout.readline() == "failed\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.communicate(timeout=60)[0] == "ends\n" and proc.returncode == 0


def test_a_held_agent_waits_for_its_go_and_ends_quietly_without_one(tmp_path):
    """``local`` starts its agent before the preflight; a preflight that fails closes the hold pipe."""
    hold, go = os.pipe()
    agent = subprocess.Popen([sys.executable, "-m", "trainer.launcher.agent", "--standalone", "--nproc-per-node=1",
                              "-m", "trainer", "train", "--checkpoint-dir", str(tmp_path / "ckpt")],
                             env={**_env(), HOLD_FD_ENV: str(hold)}, pass_fds=(hold,), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(hold)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            agent.wait(timeout=3)  # held: no rendezvous, no workers
        assert not (tmp_path / "ckpt").exists()
        os.close(go)
        out, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0 and not out and not err.strip(), err[-2000:]
    assert not (tmp_path / "ckpt").exists(), "nothing ran"


def test_give_up_reasons_name_the_cause():
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    assert give_up_reason(RendezvousTimeoutError("join")).startswith("rendezvous timed out: fewer nodes than")
    assert give_up_reason(ValueError("x")) is None, "anything else keeps its traceback"


@pytest.mark.torchrun
def test_a_rendezvous_that_times_out_says_why_in_one_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_BACKEND": "c10d",
           "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_CONF": "join_timeout=3"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "launch", "--checkpoint-dir", str(tmp_path / "ckpt"),
                           "--max-steps", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**_env(), **env})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fsdp-train: ")]
    assert len(lines) == 1 and "rendezvous timed out: fewer nodes than the minimum" in lines[0], proc.stderr[-2000:]
