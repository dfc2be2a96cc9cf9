"""kind end to end (``make e2e-kind``): install, scale 2 -> 3, delete a pod, scale to 1; resume each time.

Exit codes: 0 passed, 1 failed, 77 skipped (kind, Docker or kind's node image not available; the
reason is printed). Checks use the Kubernetes Python client (pods, job status, logs) and the
checkpoint list on the shared volume (the kind nodes mount a host directory).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.checkpoint.layout import committed_checkpoints  # noqa: E402

SHARED = Path("/tmp/fsdp-train-kind-shared/checkpoints")
RELEASE, IMAGE, NAMESPACE = "fsdp-train-e2e", "fsdp-train:0.1.0", "default"


def kind(*args: str) -> None:
    code = subprocess.run([str(ROOT / "hack" / "kind.sh"), *args]).returncode
    if code == 77:
        raise SystemExit(77)
    if code:
        raise SystemExit(f"hack/kind.sh {' '.join(args)} failed ({code})")


def wait_for_commit(predicate, what: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in reversed(committed_checkpoints(SHARED)):
            if predicate(info.marker):
                print(f"ok: {what}: step {info.step}, world size {info.marker.world_size}, "
                      f"resumed_from {info.marker.resumed_from}", flush=True)
                return info.marker
        time.sleep(5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    kind("check")
    kind("up")
    kind("load", IMAGE)
    kind("deploy", RELEASE)
    from kubernetes import client, config

    config.load_kube_config(context="kind-fsdp-train")
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=worker"

    wait_for_commit(lambda m: m.world_size == 2, "training at world size 2")
    scaled_at = time.time()
    kind("scale", RELEASE, "3")
    wait_for_commit(lambda m: m.world_size == 3 and m.created > scaled_at and m.resumed_from,
                    "resumed resharded at world size 3")
    pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
    victim = sorted(p.metadata.name for p in pods)[-1]
    deleted_at = time.time()
    core.delete_namespaced_pod(victim, NAMESPACE)
    print(f"deleted pod {victim}", flush=True)
    wait_for_commit(lambda m: m.created > deleted_at and m.resumed_from, "resumed after the pod deletion")
    scaled_at = time.time()
    kind("scale", RELEASE, "1")
    wait_for_commit(lambda m: m.world_size == 1 and m.created > scaled_at, "resumed at world size 1")
    logs = "".join(core.read_namespaced_pod_log(p.metadata.name, NAMESPACE)
                   for p in core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
                   if p.status.phase == "Running")
    job = batch.read_namespaced_job(RELEASE, NAMESPACE)  # the release name contains the chart name
    print(f"job: active {job.status.active}, succeeded {job.status.succeeded}, failed {job.status.failed}")
    if "resumed from step" not in logs:
        raise SystemExit("no 'resumed from step' line in the running pods' logs")
    kind("undeploy", RELEASE)
    print("kind e2e passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
