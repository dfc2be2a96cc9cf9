"""End to end on real containers: the chart's Indexed Job and JobSet pods, scaled, killed, drained, resumed.

Each pod of the Job that ``helm template`` renders (directly, or as the JobSet's replicated Job)
becomes a container running exactly the rendered command, args and env. Only what Kubernetes
itself provides is substituted: the pod's hostname and completion index, the DNS names of the
headless Service (the chart's, or the one JobSet creates for its subdomain) as network aliases on a
private Docker network, the ConfigMap (a read-only mount) and the PVC (one host directory shared by
all). What the controllers would do on each event is done by hand: start the pod of a new index
after ``helm upgrade --set replicas=N``, replace a killed pod, stop pods with SIGTERM on a drain.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_chart import by_kind, job_template, render

from bench.jobs import breakdown, first_reaction
from conftest import ROOT, last_step, run_cli, start_records, step_records
from trainer.checkpoint.layout import committed_checkpoints
from trainer.checkpoint.marker import CommitMarker, SaveReason
from trainer.metrics.records import read_metrics

pytestmark = pytest.mark.docker

IMAGE = "fsdp-train:0.1.0"
MEMORY_ROOT = Path("/dev/shm/fsdp-e2e")  # tmpfs on the host, as a memory emptyDir is on the node
MAX_STEPS = 600  # the drain came at step 309-371 here and in CI (the summary prints it)
EVERY = 20
COLLECTIVE_TIMEOUT = 10  # what bounds a partitioned pod's hang
TOLERANCE = 1e-5  # the trainer's resume-equivalence tolerance (tests/test_equivalence.py)
VALUES = [f"image.repository={IMAGE.split(':')[0]}", f"image.tag={IMAGE.split(':')[1]}",
          f"checkpoint.every={EVERY}", "elastic.lastCallTimeout=5", "terminationGracePeriodSeconds=40",
          "trainer.model=transformer", "trainer.d_model=64", "trainer.n_layers=2", "trainer.n_heads=4",
          "trainer.seq_len=32", "trainer.vocab_size=64", "trainer.global_batch_size=12",
          f"trainer.max_steps={MAX_STEPS}", "trainer.log_every=1", "trainer.warmup_steps=10",
          "trainer.shutdown_grace=25", "trainer.checkpoint_first_step=false",
          f"trainer.collective_timeout={COLLECTIVE_TIMEOUT}"]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} failed: {proc.stderr.strip()[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def docker_ready() -> None:
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.skip("no Docker engine: run `make image` (it installs and starts one as root) to enable this test")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.skip(f"image {IMAGE} is not built: run `make image` first")


class FakeCluster:
    """Just enough of Kubernetes (and JobSet) to run the rendered Job's pods as containers."""

    def __init__(self, helm: str, workdir: Path, kind: str) -> None:
        self.helm, self.kind = helm, kind
        self.suffix = uuid.uuid4().hex[:6]
        self.network = f"fsdp-e2e-{self.suffix}"
        self.pvc = workdir / "pvc"
        self.configmap = workdir / "configmap"
        self.pvc.mkdir(mode=0o777)
        self.pvc.chmod(0o777)
        self.configmap.mkdir()
        self.containers: dict[int, str] = {}
        self.memory: dict[int, Path] = {}  # each pod's memory emptyDir: a host tmpfs folder, new for a new pod
        self.cut_off: set[int] = set()  # pods disconnected from the network: they may exit
        docker("network", "create", self.network)

    def apply(self, replicas: int) -> dict:
        """`helm upgrade --set replicas=N`: render, check the pod template is unchanged, return the Job."""
        docs = render(self.helm, *VALUES, f"workload.kind={self.kind}", f"replicas={replicas}")
        job = job_template(docs)
        config = by_kind(docs, "ConfigMap")[0]
        for name, content in config["data"].items():
            (self.configmap / name).write_text(content)
        if hasattr(self, "job"):
            assert job["spec"]["template"] == self.job["spec"]["template"], "a scale must not touch the pod template"
        if self.kind == "IndexedJob":  # pod <job>-<index> under the chart's headless Service
            self.hostname_prefix = by_kind(docs, "Job")[0]["metadata"]["name"]
            self.subdomain = by_kind(docs, "Service")[0]["metadata"]["name"]
        else:  # JobSet: pod <jobset>-<replicated job>-<job index>-<index> under the subdomain <jobset>
            jobset = by_kind(docs, "JobSet")[0]
            self.hostname_prefix = f"{jobset['metadata']['name']}-{jobset['spec']['replicatedJobs'][0]['name']}-0"
            assert jobset["spec"]["network"]["enableDNSHostnames"]
            self.subdomain = jobset["metadata"]["name"]
        self.job = job
        return job

    def start_pod(self, index: int) -> None:
        """What the Job controller does for a missing index: a fresh pod with the rendered container."""
        spec = self.job["spec"]["template"]["spec"]
        container = spec["containers"][0]
        hostname = f"{self.hostname_prefix}-{index}"
        name = f"{hostname}-{self.suffix}"
        docker("rm", "-f", name, check=False)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"] and volumes["config"]["configMap"]
        assert volumes["snapshots"]["emptyDir"]["medium"] == "Memory"
        self.memory[index] = MEMORY_ROOT / f"{name}-{uuid.uuid4().hex[:6]}"
        self.memory[index].mkdir(parents=True)
        self.memory[index].chmod(0o777)
        security = container["securityContext"]
        args = ["run", "-d", "--name", name, "--hostname", hostname, "--network", self.network,
                "--network-alias", f"{hostname}.{self.subdomain}",
                "--user", f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}",
                "--shm-size", str(volumes["dshm"]["emptyDir"]["sizeLimit"]).replace("Gi", "g"),
                "-v", f"{self.pvc}:{mounts['checkpoints']}", "-v", f"{self.configmap}:{mounts['config']}:ro",
                "-v", f"{self.memory[index]}:{mounts['snapshots']}",
                "--tmpfs", f"{mounts['tmp']}:exec,mode=1777",
                "--stop-timeout", str(spec["terminationGracePeriodSeconds"]),
                "-e", f"JOB_COMPLETION_INDEX={index}"]
        if security["readOnlyRootFilesystem"]:
            args.append("--read-only")
        if "ALL" in security["capabilities"]["drop"]:
            args += ["--cap-drop", "ALL"]
        if not security["allowPrivilegeEscalation"]:
            args += ["--security-opt", "no-new-privileges"]
        for item in container["env"]:
            args += ["-e", f"{item['name']}={item['value']}"]
        args += ["--entrypoint", container["command"][0], container["image"], *container["command"][1:],
                 *container["args"]]
        docker(*args)
        self.containers[index] = name

    def disconnect(self, index: int) -> None:
        """A network partition: the pod keeps running, unreachable (only loopback is left)."""
        self.cut_off.add(index)
        docker("network", "disconnect", self.network, self.containers[index])

    def restart_in_place(self, index: int) -> None:
        """The kubelet restarts a failed container of a live pod: same pod, hostname and volumes."""
        docker("start", self.containers[index])

    def replace_pod(self, index: int) -> None:
        """The pod failed (or its node was drained): Kubernetes starts a new one for its index."""
        docker("rm", "-f", self.containers[index], check=False)
        self.cut_off.discard(index)
        self.start_pod(index)

    def stop_pods(self, indices: list[int], signal_name: str) -> None:
        for index in indices:
            docker("kill", "-s", signal_name, self.containers[index], check=False)

    def wait_exit(self, index: int, timeout: float) -> int:
        return int(docker("wait", self.containers[index], timeout=timeout).stdout.strip())

    def exited(self) -> list[str]:
        """Pods that exited, other than those cut off from the network (which may fail)."""
        names = docker("ps", "-a", "--filter", "status=exited", "--format", "{{.Names}}").stdout.split()
        return [name for index, name in self.containers.items() if name in names and index not in self.cut_off]

    def logs(self) -> str:
        return "\n".join(docker("logs", name, check=False).stderr for name in self.containers.values())

    def remove(self) -> None:
        for name in self.containers.values():
            docker("rm", "-f", name, check=False)
        docker("network", "rm", self.network, check=False)
        for folder in self.memory.values():
            shutil.rmtree(folder, ignore_errors=True)


def wait_until(predicate, timeout: float, what: str, cluster: FakeCluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if cluster.exited():
            raise AssertionError(f"pods exited while waiting for {what}: {cluster.exited()}\n{cluster.logs()[-6000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()[-6000:]}")


def first_step_after(pvc: Path, since: float, world_size: int | None = None) -> dict | None:
    for record in step_records(pvc):
        if record["time"] > since and (world_size is None or record["world_size"] == world_size):
            return record
    return None


def recovery(what: str, event: float, pvc: Path, cluster: FakeCluster, world_size: int) -> dict:
    """The breakdown of the first start at ``world_size`` after ``event`` (bench.jobs.breakdown)."""
    start = next(s for s in start_records(pvc) if s["time"] > event and s["world_size"] == world_size)
    return {"event": what, **breakdown(event, start, first_reaction(cluster.logs(), event))}


def sigkill_pod(index: int, cluster: FakeCluster, after_step: int) -> tuple[int, int, float]:
    """Let the job train 5 steps past ``after_step``, then SIGKILL pod ``index``'s container; the
    newest committed step and the last step before the kill, and its time."""
    wait_until(lambda: last_step(cluster.pvc) >= after_step + 5, 120, "training to go on", cluster)
    newest, step_at_kill, event = newest_commit(cluster.pvc).step, last_step(cluster.pvc), time.time()
    cluster.stop_pods([index], "KILL")
    assert cluster.wait_exit(index, 30) == 137
    return newest, step_at_kill, event


def newest_commit(pvc: Path) -> CommitMarker | None:
    committed = committed_checkpoints(pvc)
    return committed[-1].marker if committed else None


# Final loss of the uninterrupted run, per rendered config: every kind trains the same job.
_REFERENCE: dict[str, float] = {}


def uninterrupted_loss(config: Path, workdir: Path) -> float:
    text = config.read_text()
    if text not in _REFERENCE:
        reference = workdir / "reference"
        # one process: the same trajectory at any world size (global-batch semantics), and the fastest here
        run_cli("local", "--nproc", "1", "--config", str(config), "--checkpoint-dir", str(reference),
                "--no-progress", timeout=600, check=True)
        _REFERENCE[text] = step_records(reference)[-1]["loss"]
    return _REFERENCE[text]


# A replaced pod and a partition go the same way whichever kind rendered the pod (the pod, its
# volume and its network are the same): one kind runs them. Both run what depends on the kind: the
# start, the scaling, the restart in place (its restart rules), the drain and the scale-down.
KIND_NEUTRAL_EVENTS_ON = ("IndexedJob",)


@pytest.mark.parametrize("kind", ["IndexedJob", "JobSet"])
def test_scale_kill_drain_resume_on_containers(docker_ready, tmp_path, kind):
    proc = subprocess.run([str(ROOT / "hack" / "tools.sh")], capture_output=True, text=True, timeout=300)
    helm = str(Path(proc.stdout.strip()) / "helm")
    cluster = FakeCluster(helm, tmp_path, kind)
    pvc, summary, started = cluster.pvc, [], time.monotonic()
    try:
        # 1. two replicas train past the first checkpoints
        cluster.apply(2)
        for index in (0, 1):
            cluster.start_pod(index)
        wait_until(lambda: getattr(newest_commit(pvc), "step", 0) >= 2 * EVERY, 300,
                   "two checkpoints at world size 2", cluster)
        assert newest_commit(pvc).world_size == 2

        # 2. helm upgrade --set replicas=3: the Job controller starts index 2 (counted from its container's start)
        job = cluster.apply(3)
        assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 3)
        cluster.start_pod(2)
        event = time.time()
        wait_until(lambda: first_step_after(pvc, event, world_size=3), 300, "training at world size 3", cluster)
        marker = wait_until(lambda: (m := newest_commit(pvc)) and m.world_size == 3 and m, 300,
                            "a checkpoint at world size 3", cluster)
        assert marker.resumed_from.world_size == 2, marker
        summary.append(recovery("scale 2->3", event, pvc, cluster, world_size=3))

        # 3a. SIGKILL pod 1's container; the kubelet restarts it in place (the chart's restart rules):
        # its memory volume is kept, so every rank restores from its memory snapshot
        _, step_at_kill, event = sigkill_pod(1, cluster, after_step=marker.step)
        cluster.restart_in_place(1)
        resumed = wait_until(lambda: first_step_after(pvc, event + 0.5, world_size=3), 300,
                             "recovery after a restart in place", cluster)
        row = recovery("SIGKILL, restart in place", event, pvc, cluster, world_size=3)
        assert row["restored_from"] == "memory", row
        assert resumed["step"] - 1 >= step_at_kill - 1, "at most the step in flight is lost"
        summary.append(row)

        if kind in KIND_NEUTRAL_EVENTS_ON:
            # 3b. SIGKILL pod 1 again; this time the Job controller replaces the pod, with a new, empty
            # memory volume: no snapshot there, so every rank restores from disk
            newest_before, step_at_kill, event = sigkill_pod(1, cluster, after_step=resumed["step"])
            cluster.start_pod(1)
            resumed = wait_until(lambda: first_step_after(pvc, event + 0.5, world_size=3), 300,
                                 "recovery after SIGKILL", cluster)
            lost = step_at_kill - (resumed["step"] - 1)
            assert resumed["step"] - 1 >= newest_before, "must resume from the newest committed checkpoint"
            assert lost <= EVERY, f"lost {lost} steps, more than one checkpoint interval"
            row = recovery("SIGKILL pod 1, replaced", event, pvc, cluster, world_size=3)
            assert row["restored_from"] == "disk", row
            summary.append(row)

            # 4. pod 2 cut off from the network: the others' collectives time out and they go on without it
            wait_until(lambda: last_step(pvc) >= resumed["step"] + 5, 120, "training to go on", cluster)
            event = time.time()
            cluster.disconnect(2)
            wait_until(lambda: first_step_after(pvc, event, world_size=2), COLLECTIVE_TIMEOUT + 120,
                       "training on without the cut-off pod", cluster)
            summary.append(recovery("pod 2 cut off", event, pvc, cluster, world_size=2))
            # ... until it is replaced (Kubernetes does once the pod fails or its node is drained)
            cluster.replace_pod(2)
            event = time.time()
            resumed = wait_until(lambda: first_step_after(pvc, event, world_size=3), 300,
                                 "training at world size 3 again", cluster)
            summary.append(recovery("cut-off pod replaced", event, pvc, cluster, world_size=3))

        # 5. a node drain: SIGTERM to every pod -> an emergency checkpoint is committed
        wait_until(lambda: last_step(pvc) >= resumed["step"] + 5, 120, "training to go on", cluster)
        cluster.stop_pods([0, 1, 2], "TERM")
        codes = [cluster.wait_exit(index, 60) for index in (0, 1, 2)]
        drained = newest_commit(pvc)
        assert drained.reason == SaveReason.PREEMPTED and drained.world_size == 3, drained
        assert drained.step == last_step(pvc), "the emergency checkpoint holds the last completed step"

        # 6. scale down to 1 and run to completion
        cluster.apply(1)
        cluster.start_pod(0)
        event = time.time()
        assert cluster.wait_exit(0, 600) == 0, cluster.logs()[-4000:]
        resumed = first_step_after(pvc, event, world_size=1)
        assert resumed["step"] == drained.step + 1, "resumed right after the emergency checkpoint"
        summary.append(recovery("scale 3->1 after drain", event, pvc, cluster, world_size=1))
        final = newest_commit(pvc)
        assert final.step == MAX_STEPS and final.world_size == 1 and final.reason == SaveReason.FINAL
    finally:
        cluster.remove()

    # The same config, uninterrupted, on this machine: the final loss must match.
    ref_loss = uninterrupted_loss(tmp_path / "configmap" / "config.yaml", tmp_path)
    loss = step_records(pvc)[-1]["loss"]
    worlds = sorted({r["world_size"] for r in step_records(pvc)})
    resumes = [r for r in read_metrics(pvc) if r.get("event") == "start" and r.get("resumed_from")]
    lines = [f"e2e-docker {kind} summary ({time.monotonic() - started:.0f}s): world sizes seen {worlds}, "
             f"{len(resumes)} resumes, drained at step {drained.step} of {MAX_STEPS}, exit codes {codes}",
             f"  {'event (seconds)':26} {'detect':>7} {'stop':>7} {'restart':>7} {'total':>7}  steps lost  "
             "restored from",
             *(f"  {row['event']:26} {row['detection_s']:7.1f} {row['stop_s']:7.1f} {row['restart_s']:7.1f} "
               f"{row['total_s']:7.1f}  {row['steps_lost']:10}  {row['restored_from']}" for row in summary),
             f"  final loss {loss:.7f} vs uninterrupted {ref_loss:.7f} (|diff| {abs(loss - ref_loss):.1e}, "
             f"tolerance {TOLERANCE:.0e})"]
    print("\n" + "\n".join(lines))
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / f"e2e-docker-{kind.lower()}-summary.json").write_text(json.dumps(
        {"kind": kind, "worlds": worlds, "resumes": len(resumes), "drained_step": drained.step, "events": summary,
         "loss": loss, "reference_loss": ref_loss}))
    assert {1, 2, 3} <= set(worlds)
    if kind not in KIND_NEUTRAL_EVENTS_ON:
        assert len(resumes) >= 3, "scaling up, the restart in place and the scale-down each resume"
    else:
        assert len(resumes) >= 5, "scaling up, the replaced pods, the partition and the scale-down each resume"
        partition = next(row for row in summary if row["event"] == "pod 2 cut off")
        # the target is --collective-timeout + 35 s, reported above; what must hold is that the timeout bounds it
        assert partition["total_s"] < COLLECTIVE_TIMEOUT + 90, partition
    assert abs(loss - ref_loss) <= TOLERANCE
