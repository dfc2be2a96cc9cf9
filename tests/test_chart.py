"""The Helm chart: lint, schema-valid objects for every mode, a container the trainer accepts, bad values refused."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CHART = ROOT / "helm" / "fsdp-train"
K8S_VERSION = "1.31.0"


@pytest.fixture(scope="module")
def helm() -> str:
    proc = subprocess.run([str(ROOT / "hack" / "tools.sh")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(Path(proc.stdout.strip()) / "helm")


def helm_template(helm: str, *sets: str) -> subprocess.CompletedProcess:
    args = [helm, "template", "t", str(CHART)]
    for value in sets:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def render(helm: str, *sets: str) -> list[dict]:
    proc = helm_template(helm, *sets)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_error(helm: str, *sets: str) -> str:
    proc = helm_template(helm, *sets)
    assert proc.returncode != 0, f"helm template accepted {sets}"
    return proc.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_template(docs: list[dict]) -> dict:
    jobs = by_kind(docs, "Job")
    if jobs:
        return jobs[0]["spec"]["template"]
    return by_kind(docs, "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]


def test_lint_strict(helm):
    proc = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


MATRIX = list(itertools.product(["IndexedJob", "PyTorchJob"], [False, True], [1, 2, 4]))


@pytest.mark.parametrize("kind,gpu,replicas", MATRIX, ids=[f"{k}-{'gpu' if g else 'cpu'}-{r}" for k, g, r in MATRIX])
def test_rendered_objects_are_schema_valid(helm, kind, gpu, replicas):
    import kubernetes_validate
    from kubeflow.training import ApiClient

    docs = render(helm, f"workload.kind={kind}", f"gpu.enabled={str(gpu).lower()}", f"replicas={replicas}")
    kinds = sorted(doc["kind"] for doc in docs)
    expected = ["ConfigMap", "PersistentVolumeClaim", "Pod"] + (
        ["Job", "Service"] if kind == "IndexedJob" else ["PyTorchJob"])
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            client = ApiClient()
            model = client._ApiClient__deserialize(doc, "KubeflowOrgV1PyTorchJob")
            # A field the model does not know is dropped on the way in: the round trip must be lossless.
            assert client.sanitize_for_serialization(model) == doc
            worker = model.spec.pytorch_replica_specs["Worker"]
            assert worker.replicas == replicas and model.spec.elastic_policy.rdzv_backend == "c10d"
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    container = pod_template(docs)["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    assert ("nvidia.com/gpu" in limits) == gpu
    workload = by_kind(docs, "Job") or by_kind(docs, "PyTorchJob")
    assert workload


@pytest.mark.parametrize("kind", ["IndexedJob", "PyTorchJob"])
@pytest.mark.parametrize("gpu", [False, True])
def test_container_command_env_and_mounts_are_what_the_trainer_accepts(helm, kind, gpu, tmp_path, monkeypatch):
    from torch.distributed.run import get_args_parser

    from trainer.cli import parse_args
    from trainer.config import resolve_config

    docs = render(helm, f"workload.kind={kind}", f"gpu.enabled={str(gpu).lower()}")
    container = pod_template(docs)["spec"]["containers"][0]
    assert container["command"] == ["fsdp-train", "launch"]
    config_map = by_kind(docs, "ConfigMap")[0]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_map["data"]["config.yaml"])
    args = [str(config_path) if arg == "/etc/fsdp-train/config.yaml" else arg for arg in container["args"]]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/etc/fsdp-train" in mounts and "/dev/shm" in mounts
    env = {item["name"]: item["value"] for item in container["env"]}
    trainer_env = {k: v for k, v in env.items() if k.startswith("FSDP_TRAIN_")}
    launch = parse_args([*container["command"][1:], *args])  # exactly how the entrypoint parses it
    assert launch.command == "launch"
    cfg = resolve_config(parse_args(["train", *launch.train_args]), environ=trainer_env)
    assert cfg.checkpoint_dir in mounts, "the checkpoint dir must be the mounted volume"
    assert cfg.device == ("cuda" if gpu else "cpu")
    pet = {k: v for k, v in env.items() if k.startswith("PET_")}
    for key, value in pet.items():
        monkeypatch.setenv(key, value)
    torchrun = get_args_parser().parse_args(["-m", "trainer", "train"])  # PET_* become torchrun's settings
    assert torchrun.nproc_per_node == env["PET_NPROC_PER_NODE"]
    if kind == "IndexedJob":
        assert torchrun.nnodes == "1:4" and torchrun.rdzv_backend == "c10d"
        service = by_kind(docs, "Service")[0]["metadata"]["name"]
        job = by_kind(docs, "Job")[0]["metadata"]["name"]
        assert torchrun.rdzv_endpoint == f"{job}-0.{service}:29400"
        assert pod_template(docs)["spec"]["subdomain"] == service


def test_scaling_changes_only_completions_and_parallelism(helm):
    """Job pod templates are immutable: `helm upgrade --set replicas=N` must leave the template untouched."""
    two, three = by_kind(render(helm, "replicas=2"), "Job")[0], by_kind(render(helm, "replicas=3"), "Job")[0]
    assert two["spec"]["template"] == three["spec"]["template"]
    assert two["metadata"]["name"] == three["metadata"]["name"]
    assert (three["spec"]["completions"], three["spec"]["parallelism"]) == (3, 3)
    for spec in (two["spec"], three["spec"]):
        spec.pop("completions"), spec.pop("parallelism")
    assert two["spec"] == three["spec"]


def test_restricted_pod_security(helm):
    spec = pod_template(render(helm))["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    security = spec["containers"][0]["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_existing_claim_replaces_the_created_one(helm):
    docs = render(helm, "checkpoint.pvc.existingClaim=shared-ckpt")
    assert not by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_template(docs)["spec"]["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "shared-ckpt"


def test_helm_test_hook_verifies_the_newest_checkpoint(helm):
    hook = by_kind(render(helm), "Pod")[0]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = hook["spec"]["containers"][0]["command"]
    assert command == ["fsdp-train", "ckpt", "verify", "--newest", "/checkpoints"]
    from trainer.cli import parse_args

    parsed = parse_args(command[1:])
    assert parsed.newest and parsed.target == "/checkpoints"


BAD_VALUES = [
    (["replicas=0"], "/replicas"),
    (["elastic.minReplicas=3", "elastic.maxReplicas=2", "replicas=2"], "elastic.minReplicas (3) must not exceed"),
    (["replicas=5"], "replicas (5) must lie within"),
    (["workload.kind=Deployment"], "IndexedJob', 'PyTorchJob"),
    (["image.repository="], "/image/repository"),
    (["checkpoint.pvc.create=false"], "no checkpoint storage"),
    (["checkpoint.every=0"], "/checkpoint/every"),
]


@pytest.mark.parametrize("sets,message", BAD_VALUES, ids=[s[0][0] for s in BAD_VALUES])
def test_bad_values_are_rejected_with_a_message(helm, sets, message):
    assert message in render_error(helm, *sets)


def test_values_table_in_readme_covers_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(tree: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in tree.items():
            if isinstance(value, dict) and value and key != "trainer":
                out += leaves(value, f"{prefix}{key}.")
            else:
                out.append(prefix + key)
        return out

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in leaves(values) if f"`{name}`" not in readme]
    assert not missing, f"README values table lacks {missing}"

