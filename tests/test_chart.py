"""The Helm chart: lint, every kind's objects valid against its own project's API, one pod spec the
trainer and torchrun accept, scaling that leaves the pod template alone, bad values refused."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT

CHART = ROOT / "helm" / "fsdp-train"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSION = "1.31.0"  # rendered for and validated against; container restart rules need RESTART_RULES_VERSION
RESTART_RULES_VERSION = "1.35.0"
KINDS = ["IndexedJob", "JobSet", "TrainJob", "PyTorchJob"]
WORKLOAD_OBJECTS = {"IndexedJob": ["Job", "Service"], "JobSet": ["JobSet"],
                    "TrainJob": ["TrainJob", "TrainingRuntime"], "PyTorchJob": ["PyTorchJob"]}
CONTAINER_NAME = {"IndexedJob": "trainer", "JobSet": "trainer", "TrainJob": "node", "PyTorchJob": "pytorch"}


@pytest.fixture(scope="module")
def helm() -> str:
    proc = subprocess.run([str(ROOT / "hack" / "tools.sh")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(Path(proc.stdout.strip()) / "helm")


def helm_template(helm: str, *sets: str, values: Path | None = None,
                  kube_version: str = K8S_VERSION) -> subprocess.CompletedProcess:
    args = [helm, "template", "t", str(CHART), "--kube-version", kube_version]
    if values:
        args += ["--values", str(values)]
    for value in sets:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def render(helm: str, *sets: str, values: Path | None = None, kube_version: str = K8S_VERSION) -> list[dict]:
    proc = helm_template(helm, *sets, values=values, kube_version=kube_version)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_error(helm: str, *sets: str) -> str:
    proc = helm_template(helm, *sets)
    assert proc.returncode != 0, f"helm template accepted {sets}"
    return proc.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def workload_kind(docs: list[dict]) -> str:
    present = {doc["kind"] for doc in docs}
    return next(kind for kind, objects in WORKLOAD_OBJECTS.items() if objects[0] in present)


def job_template(docs: list[dict]) -> dict:
    """The Job template (JobTemplateSpec) of the Job-based kinds."""
    kind = workload_kind(docs)
    if kind == "IndexedJob":
        return by_kind(docs, "Job")[0]
    if kind == "JobSet":
        return by_kind(docs, "JobSet")[0]["spec"]["replicatedJobs"][0]["template"]
    return by_kind(docs, "TrainingRuntime")[0]["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]


def pod_template(docs: list[dict]) -> dict:
    if workload_kind(docs) == "PyTorchJob":
        return by_kind(docs, "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    return job_template(docs)["spec"]["template"]


def node_count(docs: list[dict]) -> int:
    kind = workload_kind(docs)
    if kind == "TrainJob":
        return by_kind(docs, "TrainJob")[0]["spec"]["trainer"]["numNodes"]
    if kind == "PyTorchJob":
        return by_kind(docs, "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    spec = job_template(docs)["spec"]
    assert spec["completions"] == spec["parallelism"]
    return spec["parallelism"]


def kubeflow_trainer_model(kind: str):
    from kubeflow_trainer_api import models

    return {"JobSet": models.JobsetV1alpha2JobSet, "TrainJob": models.TrainerV1alpha1TrainJob,
            "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime}[kind]


def validate(doc: dict) -> None:
    """Each object against its own project's API: Kubernetes' schema (strict) for the core kinds,
    the JobSet and Kubeflow Trainer models for theirs, the training-operator model for PyTorchJob;
    a custom resource's embedded Job or pod template also against Kubernetes' schema."""
    import kubernetes_validate

    kind = doc["kind"]
    if kind == "PyTorchJob":
        from kubeflow.training import ApiClient

        client = ApiClient()
        model = client._ApiClient__deserialize(doc, "KubeflowOrgV1PyTorchJob")
        # A field the model does not know is dropped on the way in: the round trip must be lossless.
        assert client.sanitize_for_serialization(model) == doc
        template = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"},
                                      "template": template}, K8S_VERSION, strict=True)
    elif kind in ("JobSet", "TrainJob", "TrainingRuntime"):
        assert kubeflow_trainer_model(kind).from_dict(doc).to_dict() == doc, f"{kind}: fields lost in a round trip"
        jobset_spec = doc["spec"] if kind == "JobSet" else doc["spec"].get("template", {}).get("spec")
        for replicated in (jobset_spec or {}).get("replicatedJobs", []):
            kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                                          **replicated["template"]}, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_lint_strict(helm):
    for values in [None, *CI_VALUES]:
        extra = ["--values", str(values)] if values else []
        proc = subprocess.run([helm, "lint", "--strict", str(CHART), *extra], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, f"{values}: {proc.stdout + proc.stderr}"


def test_ci_values_cover_every_supported_combination():
    combinations = set()
    for path in CI_VALUES:
        values = yaml.safe_load(path.read_text())
        combinations.add((values["workload"]["kind"], values["gpu"]["enabled"],
                          bool(values.get("kueue", {}).get("queueName"))))
    expected = {(kind, gpu, kueue) for kind in KINDS for gpu in (False, True) for kueue in (False, True)
                if not (kind == "PyTorchJob" and kueue)}
    assert combinations == expected


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name.removesuffix("-values.yaml") for p in CI_VALUES])
def test_every_ci_combination_renders_valid_objects(helm, values):
    settings = yaml.safe_load(values.read_text())
    kind, gpu = settings["workload"]["kind"], settings["gpu"]["enabled"]
    queue = settings.get("kueue", {}).get("queueName", "")
    docs = render(helm, values=values)
    assert sorted(doc["kind"] for doc in docs) == sorted(
        ["ConfigMap", "PersistentVolumeClaim", "Pod", *WORKLOAD_OBJECTS[kind]])
    for doc in docs:
        validate(doc)
    container = pod_template(docs)["spec"]["containers"][0]
    assert container["name"] == CONTAINER_NAME[kind]
    limits = container.get("resources", {}).get("limits", {})
    assert ("nvidia.com/gpu" in limits) == gpu
    workload = by_kind(docs, WORKLOAD_OBJECTS[kind][0])[0]
    labels = workload["metadata"]["labels"]
    assert labels.get("kueue.x-k8s.io/queue-name") == (queue or None)
    if kind != "PyTorchJob":
        assert workload["spec"].get("suspend") == (True if queue else None), "Kueue starts a suspended workload"
    trainer = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    if "own-model" in values.name:  # the user's model, from a package on a mounted folder, on their data
        from trainer.config import is_plugin

        assert is_plugin(trainer["model"]), trainer["model"]
        package_root = settings["pythonPath"][0]
        assert any(m["mountPath"] == package_root for m in container["volumeMounts"]), "the package is mounted"
        assert trainer["data"].startswith(settings["data"]["mountPath"])
    else:
        assert trainer["model"] == "transformer" and "data" not in trainer


@pytest.mark.parametrize("kind", KINDS)
def test_pod_template_does_not_depend_on_replicas(helm, kind):
    """Job pod templates are immutable: `helm upgrade --set replicas=N` may change only the node count."""
    one = render(helm, f"workload.kind={kind}", "replicas=1")
    three = render(helm, f"workload.kind={kind}", "replicas=3")
    assert (node_count(one), node_count(three)) == (1, 3)
    changed = [a["kind"] for a, b in zip(one, three) if a != b]
    assert changed == [WORKLOAD_OBJECTS[kind][0]], f"only the workload's node count changes, not {changed}"
    assert pod_template(one) == pod_template(three)
    if kind != "PyTorchJob":
        for docs in (one, three):
            spec = job_template(docs)["spec"]
            spec.pop("completions", None), spec.pop("parallelism", None)
        assert job_template(one) == job_template(three)


def injected_env(kind: str, docs: list[dict], pod_index: int) -> dict[str, str]:
    """What the controller of each kind adds to the container's environment."""
    if kind == "TrainJob":  # Kubeflow Trainer's torch plugin (pkg/runtime/framework/plugins/torch)
        name = by_kind(docs, "TrainJob")[0]["metadata"]["name"]
        trainer = by_kind(docs, "TrainJob")[0]["spec"]["trainer"]
        return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_NODE_RANK": str(pod_index), "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
                "PET_MASTER_PORT": "29400", "JOB_COMPLETION_INDEX": str(pod_index)}
    if kind == "PyTorchJob":  # the training operator's elastic PET_* variables
        elastic = by_kind(docs, "PyTorchJob")[0]["spec"]["elasticPolicy"]
        name = by_kind(docs, "PyTorchJob")[0]["metadata"]["name"]
        return {"PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}", "PET_RDZV_BACKEND": "c10d",
                "PET_RDZV_ENDPOINT": f"{name}-worker-0:23456", "PET_MAX_RESTARTS": str(elastic["maxRestarts"])}
    return {"JOB_COMPLETION_INDEX": str(pod_index)}


def pod_hostname(kind: str, docs: list[dict], index: int) -> tuple[str, str]:
    """(hostname, subdomain) Kubernetes gives worker pod `index` of each Job-based kind."""
    name = by_kind(docs, WORKLOAD_OBJECTS[kind][0])[0]["metadata"]["name"]
    if kind == "IndexedJob":
        return f"{name}-{index}", pod_template(docs)["spec"]["subdomain"]
    replicated = "workers" if kind == "JobSet" else "node"
    return f"{name}-{replicated}-0-{index}", name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gpu", [False, True])
def test_container_command_env_and_mounts_are_what_the_trainer_and_torchrun_accept(helm, kind, gpu, tmp_path,
                                                                                   monkeypatch):
    from torch.distributed.run import get_args_parser

    from trainer.cli import parse_args
    from trainer.config import resolve_config
    from trainer.launcher.launch import launch_command

    docs = render(helm, f"workload.kind={kind}", f"gpu.enabled={str(gpu).lower()}")
    container = pod_template(docs)["spec"]["containers"][0]
    assert container["command"] == ["fsdp-train", "launch"]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    args = [str(config_path) if arg == "/etc/fsdp-train/config.yaml" else arg for arg in container["args"]]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/etc/fsdp-train" in mounts and "/dev/shm" in mounts
    env = {item["name"]: item["value"] for item in container["env"]}
    env.update(injected_env(kind, docs, pod_index=1))  # the controller's variables replace the chart's
    launch = parse_args([*container["command"][1:], *args])  # exactly how the entrypoint parses it
    assert launch.command == "launch"
    trainer_env = {k: v for k, v in env.items() if k.startswith("FSDP_TRAIN_")}
    cfg = resolve_config(parse_args(["train", *launch.train_args]), environ=trainer_env)
    assert cfg.checkpoint_dir in mounts, "the checkpoint dir must be the mounted volume"
    assert cfg.device == ("cuda" if gpu else "cpu")
    for key, value in env.items():
        if key.startswith("PET_"):
            monkeypatch.setenv(key, value)
    command = launch_command(cfg, launch.train_args, env, launch.nnodes)
    torchrun = get_args_parser().parse_args(command[3:])  # the PET_* variables become torchrun's defaults
    assert torchrun.nnodes == "1:4", "every kind trains on any node count in [minReplicas, maxReplicas]"
    assert torchrun.rdzv_backend == "c10d" and torchrun.nproc_per_node == "1"
    assert torchrun.shutdown_timeout == cfg.shutdown_grace + 5
    assert cfg.shutdown_grace + 10 <= pod_template(docs)["spec"]["terminationGracePeriodSeconds"]
    if kind != "PyTorchJob":
        hostname, subdomain = pod_hostname(kind, docs, index=0)
        assert torchrun.rdzv_endpoint == f"{hostname}.{subdomain}:29400", "the rendezvous is on the first pod"
        if kind == "IndexedJob":
            assert by_kind(docs, "Service")[0]["metadata"]["name"] == subdomain


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_shares_one_pod_spec_and_the_test_hook(helm, kind):
    reference = copy.deepcopy(pod_template(render(helm, "workload.kind=IndexedJob"))["spec"])
    spec = copy.deepcopy(pod_template(render(helm, f"workload.kind={kind}"))["spec"])
    for pod in (reference, spec):
        container = pod["containers"][0]
        container["name"] = "c"
        container["env"] = [e for e in container["env"] if not e["name"].startswith("PET_")]
        container["args"] = [a for a in container["args"] if a not in ("--nnodes", "1:4")]
        pod.pop("subdomain", None), pod.pop("restartPolicy", None)
    assert spec == reference
    hooks = by_kind(render(helm, f"workload.kind={kind}"), "Pod")
    assert [h["metadata"]["annotations"]["helm.sh/hook"] for h in hooks] == ["test"]


def test_restricted_pod_security_by_default(helm):
    spec = pod_template(render(helm))["spec"]
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    assert spec["securityContext"]["runAsNonRoot"] is True
    security = spec["containers"][0]["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_platform_assigned_uids(helm):
    """OpenShift's restricted SCC picks the uid: the chart must be able to leave it out."""
    docs = render(helm, "podSecurityContext.runAsUser=null", "podSecurityContext.runAsGroup=null",
                  "podSecurityContext.fsGroup=null")
    for spec in (pod_template(docs)["spec"], by_kind(docs, "Pod")[0]["spec"]):
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    custom = pod_template(render(helm, "containerSecurityContext.readOnlyRootFilesystem=false"))["spec"]
    assert custom["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False


IMAGES = [
    ([], "fsdp-train:0.1.0"),  # the tag defaults to the chart's appVersion
    (["image.tag=1.2"], "fsdp-train:1.2"),
    (["image.registry=registry.example.com:5000/ml"], "registry.example.com:5000/ml/fsdp-train:0.1.0"),
    ([f"image.digest=sha256:{'a' * 64}", "image.tag=1.2"], f"fsdp-train@sha256:{'a' * 64}"),
]


@pytest.mark.parametrize("sets,image", IMAGES, ids=["appVersion", "tag", "registry", "digest"])
def test_image_reference(helm, sets, image):
    docs = render(helm, *sets)
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert image.replace("0.1.0", chart_version) == image, "IMAGES assumes appVersion 0.1.0"
    assert pod_template(docs)["spec"]["containers"][0]["image"] == image
    assert by_kind(docs, "Pod")[0]["spec"]["containers"][0]["image"] == image


def test_pull_secrets_scheduling_and_common_metadata(helm):
    docs = render(helm, "imagePullSecrets[0].name=regcred", "priorityClassName=batch-low", "schedulerName=volcano",
                  "topologySpreadConstraints[0].maxSkew=1",
                  "topologySpreadConstraints[0].topologyKey=kubernetes.io/hostname",
                  "topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
                  "commonLabels.team=ml", "commonAnnotations.owner=alice", "podLabels.extra=yes")
    spec = pod_template(docs)["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert (spec["priorityClassName"], spec["schedulerName"]) == ("batch-low", "volcano")
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert by_kind(docs, "Pod")[0]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for doc in docs:
        assert doc["metadata"]["labels"]["team"] == "ml", doc["kind"]
        assert doc["metadata"]["annotations"]["owner"] == "alice", doc["kind"]
    assert pod_template(docs)["metadata"]["labels"]["extra"] == "yes"
    pvc = by_kind(docs, "PersistentVolumeClaim")[0]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", "commonAnnotations keep the claim's"


def test_service_account_with_token_gets_a_role_to_read_pods(helm):
    docs = render(helm, "serviceAccount.create=true", "serviceAccount.automountToken=true",
                  "serviceAccount.annotations.iam\\.example\\.com/role=ckpt-writer")
    account = by_kind(docs, "ServiceAccount")[0]
    assert account["metadata"]["annotations"] == {"iam.example.com/role": "ckpt-writer"}
    spec = pod_template(docs)["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"] and spec["automountServiceAccountToken"]
    role, binding = by_kind(docs, "Role")[0], by_kind(docs, "RoleBinding")[0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]
    for doc in docs:
        validate(doc)
    no_token = render(helm, "serviceAccount.create=true")
    assert not by_kind(no_token, "Role") and pod_template(no_token)["spec"]["automountServiceAccountToken"] is False
    named = pod_template(render(helm, "serviceAccount.name=existing"))["spec"]
    assert named["serviceAccountName"] == "existing"


def test_existing_claim_replaces_the_created_one(helm):
    docs = render(helm, "checkpoint.pvc.existingClaim=shared-ckpt")
    assert not by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_template(docs)["spec"]["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "shared-ckpt"


@pytest.mark.parametrize("kind", KINDS)
def test_a_dataset_claim_and_a_model_package_reach_the_trainer(helm, kind, tmp_path):
    from trainer.cli import parse_args
    from trainer.config import resolve_config

    own = CHART / "ci" / "jobset-cpu-own-model-values.yaml"
    docs = render(helm, f"workload.kind={kind}", values=own)
    spec = pod_template(docs)["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "team-datasets", "readOnly": True}
    assert mounts["/data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "team-models" and "/opt/models" in mounts
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PYTHONPATH"] == "/opt/models" and env["HF_HUB_OFFLINE"] == "1"
    config = tmp_path / "config.yaml"
    config.write_text(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    cfg = resolve_config(parse_args(["train", "--config", str(config)]), environ={})
    assert cfg.data == "/data/stdlib" and cfg.data.startswith(mounts["/data"]["mountPath"])
    for doc in docs:
        validate(doc)
    plain = pod_template(render(helm, f"workload.kind={kind}"))["spec"]
    assert "data" not in {v["name"] for v in plain["volumes"]}
    assert "PYTHONPATH" not in {e["name"] for e in plain["containers"][0]["env"]}


def test_helm_test_hook_verifies_the_newest_checkpoint(helm):
    hook = by_kind(render(helm), "Pod")[0]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = hook["spec"]["containers"][0]["command"]
    assert command == ["fsdp-train", "ckpt", "verify", "--newest", "/checkpoints"]
    from trainer.cli import parse_args

    parsed = parse_args(command[1:])
    assert parsed.newest and parsed.target == "/checkpoints"


def test_shutdown_grace_fallback_is_the_trainers_default(helm):
    from trainer.config import TrainConfig

    grace = TrainConfig().shutdown_grace
    assert f"trainer.shutdown_grace ({grace:g})" in render_error(
        helm, "trainer.shutdown_grace=null", f"terminationGracePeriodSeconds={int(grace) + 9}")
    render(helm, "trainer.shutdown_grace=null", f"terminationGracePeriodSeconds={int(grace) + 10}")


BAD_VALUES = [
    (["replicas=0"], "/replicas"),
    (["elastic.minReplicas=3", "elastic.maxReplicas=2", "replicas=2"], "elastic.minReplicas (3) must not exceed"),
    (["replicas=5"], "replicas (5) must lie within"),
    (["workload.kind=Deployment"], "'IndexedJob', 'JobSet', 'TrainJob', 'PyTorchJob'"),
    (["image.repository="], "/image/repository"),
    (["image.digest=0123abcd"], "/image/digest"),
    (["checkpoint.pvc.create=false"], "no checkpoint storage"),
    (["checkpoint.every=0"], "/checkpoint/every"),
    (["workload.kind=PyTorchJob", "kueue.queueName=team-a"],
     "kueue.queueName cannot be used with workload.kind=PyTorchJob"),
    (["kueue.queueName=Team_A"], "/kueue/queueName"),
    (["data.existingClaim=ds", "trainer.vocab_size=257", "trainer.data=/elsewhere"],
     "trainer.data is set by data.existingClaim"),
    (["trainer.max_step=10"], "additional properties 'max_step' not allowed"),
    (["trainer.max_steps=ten"], "/trainer/max_steps"),
    (["trainer.mixed_precision=fp16"], "/trainer/mixed_precision"),
    (["trainer.checkpoint_every=5"], "additional properties 'checkpoint_every' not allowed"),
    (["data.mountPath=data"], "/data/mountPath"),
    (["pythonPath={models}"], "/pythonPath/0"),
    (["extraEnv[0].name=PYTHONPATH", "extraEnv[0].value=/x"], "/extraEnv/0/name"),
    (["terminationGracePeriodSeconds=45"],
     "terminationGracePeriodSeconds (45) must be at least trainer.shutdown_grace (40) + 10 = 50"),
]


@pytest.mark.parametrize("sets,message", BAD_VALUES, ids=[s[0][-1] for s in BAD_VALUES])
def test_bad_values_are_rejected_with_a_message(helm, sets, message):
    assert message in render_error(helm, *sets)


def test_the_values_table_is_generated_from_values_yaml(tmp_path):
    check = [sys.executable, str(ROOT / "hack" / "values_table.py"), "--check"]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    values = (CHART / "values.yaml").read_text()
    drifted = tmp_path / "values.yaml"
    drifted.write_text(values.replace("# -- Save a checkpoint every K steps", "# -- Save every K steps"))
    proc = subprocess.run([*check, "--values", str(drifted)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "run `make values-table`" in proc.stderr
    undocumented = tmp_path / "undocumented.yaml"
    undocumented.write_text(values.replace("# -- Pod tolerations.\n", ""))
    proc = subprocess.run([*check, "--values", str(undocumented)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no `# --` comment for tolerations" in proc.stderr


def test_launch_gives_torchrun_a_stop_timeout_that_covers_the_emergency_checkpoint():
    from torch.distributed.run import get_args_parser

    from trainer.config import TrainConfig
    from trainer.launcher.launch import launch_command

    parse = lambda command: get_args_parser().parse_args(command[3:])
    torchrun = parse(launch_command(TrainConfig(shutdown_grace=40.5), [], {}, "2:3"))
    assert (torchrun.shutdown_timeout, torchrun.nnodes) == (46, "2:3")
    # a PET_SHUTDOWN_TIMEOUT set by the user is left to torchrun
    assert "--shutdown-timeout" not in " ".join(launch_command(TrainConfig(), [], {"PET_SHUTDOWN_TIMEOUT": "9"}))


JOB_KINDS = ["IndexedJob", "JobSet", "TrainJob"]
RESTART_IN_PLACE = {"restartPolicy": "Never", "restartPolicyRules": [
    {"action": "Restart", "exitCodes": {"operator": "NotIn", "values": [0, 2]}}]}


def restart_fields(container: dict) -> dict:
    return {key: container[key] for key in RESTART_IN_PLACE if key in container}


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_failed_containers_restart_in_place_where_the_cluster_has_restart_rules(helm, kind):
    import kubernetes_validate

    kind_set = f"workload.kind={kind}"
    docs = render(helm, kind_set, kube_version=RESTART_RULES_VERSION)
    assert restart_fields(pod_template(docs)["spec"]["containers"][0]) == RESTART_IN_PLACE
    assert pod_template(docs)["spec"]["restartPolicy"] == "Never", "the Job still replaces a pod that fails"
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                                  **({"spec": job_template(docs)["spec"]})}, RESTART_RULES_VERSION, strict=True)
    assert restart_fields(pod_template(render(helm, kind_set))["spec"]["containers"][0]) == {}, "auto: not on 1.31"
    assert restart_fields(pod_template(render(helm, kind_set, "restartInPlace=false",
                                              kube_version=RESTART_RULES_VERSION))["spec"]["containers"][0]) == {}
    assert restart_fields(pod_template(render(helm, kind_set, "restartInPlace=true"))["spec"]["containers"][0]) \
        == RESTART_IN_PLACE


def test_pytorchjob_keeps_the_operators_restart_policy(helm):
    docs = render(helm, "workload.kind=PyTorchJob", kube_version=RESTART_RULES_VERSION)
    assert restart_fields(pod_template(docs)["spec"]["containers"][0]) == {}


def snapshot_volume(docs: list[dict]) -> dict | None:
    spec = pod_template(docs)["spec"]
    return next((volume for volume in spec["volumes"] if volume["name"] == "snapshots"), None)


def test_the_memory_tier_volume_is_sized_from_the_model_and_counted_in_memory(helm):
    from trainer.config import TrainConfig, with_preset
    from trainer.models.build import build_model

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cfg = TrainConfig(**with_preset(values["trainer"]))
    params = sum(p.numel() for p in build_model(cfg).parameters())
    for min_replicas in (1, 2):
        docs = render(helm, f"elastic.minReplicas={min_replicas}", "replicas=2")
        volume = snapshot_volume(docs)
        assert volume["emptyDir"]["medium"] == "Memory"
        assert int(volume["emptyDir"]["sizeLimit"]) == 24 * params // min_replicas * 5 // 4 + 64 * 2**20
        container = pod_template(docs)["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "snapshots")
        assert {"name": "FSDP_TRAIN_SNAPSHOT_ROOT", "value": mount["mountPath"]} in container["env"]
    config = yaml.safe_load(by_kind(render(helm), "ConfigMap")[0]["data"]["config.yaml"])
    assert config["snapshot_every"] == 1
    assert snapshot_volume(render(helm, "memoryTier.sizeLimit=3Gi"))["emptyDir"]["sizeLimit"] == "3Gi"
    off = render(helm, "memoryTier.every=0")
    assert snapshot_volume(off) is None
    assert yaml.safe_load(by_kind(off, "ConfigMap")[0]["data"]["config.yaml"])["snapshot_every"] == 0
    auto = yaml.safe_load(by_kind(render(helm, "memoryTier.every=auto"), "ConfigMap")[0]["data"]["config.yaml"])
    assert TrainConfig(**auto).snapshot_every == "auto"
    assert "memoryTier" in render_error(helm, "memoryTier.every=sometimes")


@pytest.mark.parametrize(("sets", "message"), [
    (["trainer.model=mypkg.models:build"], "memoryTier.sizeLimit: set it for your own model"),
    (["data.existingClaim=team-data"], "memoryTier.sizeLimit: set trainer.vocab_size to your dataset's vocabulary"),
])
def test_a_model_the_chart_cannot_size_needs_the_snapshot_size_given(helm, sets, message):
    assert message in render_error(helm, *sets)
    render(helm, *sets, "memoryTier.sizeLimit=2Gi")


def test_a_preset_is_not_masked_by_the_charts_defaults_and_sizes_the_memory_tier(helm):
    """The chart's sizes come from a preset, so another preset takes effect (sizes given as well win),
    and its table of presets is the trainer's: each preset's memory volume fits that model."""
    from trainer.config import PRESETS, TrainConfig, with_preset
    from trainer.models.build import build_model

    def trained(*sets: str) -> tuple[TrainConfig, int]:
        docs = render(helm, *sets)
        settings = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
        return TrainConfig(**with_preset(settings)), int(snapshot_volume(docs)["emptyDir"]["sizeLimit"])

    for preset, sizes in PRESETS.items():
        cfg, limit = trained(f"trainer.preset={preset}")
        assert {name: getattr(cfg, name) for name in sizes} == sizes, preset
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(cfg).parameters())
        assert limit == 24 * params * 5 // 4 + 64 * 2**20, preset
    cfg, _ = trained("trainer.preset=small", "trainer.d_model=128")
    assert (cfg.d_model, cfg.n_layers) == (128, PRESETS["small"]["n_layers"]), "a size given as well wins"


def test_the_trainer_schema_is_generated_from_train_config():
    proc = subprocess.run([sys.executable, str(ROOT / "hack" / "trainer_schema.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["trainer"]
    assert schema["additionalProperties"] is False and "max_steps" in schema["properties"]


def test_the_dataset_is_prepared_once_by_a_hook_job_before_the_workers(helm):
    from trainer.cli import build_parser

    sets = ["data.existingClaim=team-data", "data.subPath=wiki", "trainer.vocab_size=300",
            "data.prepare.enabled=true", "data.prepare.sourceClaim=raw-text", "data.prepare.sourcePath=wiki/",
            "data.prepare.args={--train-tokenizer,300}"]
    docs = render(helm, *sets)
    job = next(doc for doc in by_kind(docs, "Job") if doc["metadata"]["name"].endswith("-prepare-data"))
    validate(job)
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade", "before the workers, each time"
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    args = build_parser().parse_args(command[1:])
    assert command[0] == "fsdp-train" and args.inputs == ["/source/wiki"] and args.out == "/data/wiki"
    assert args.skip_if_prepared and args.train_tokenizer == 300, "prepared once: a complete dataset is kept"
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert mounts["source"]["readOnly"] and claims["source"]["claimName"] == "raw-text"
    assert not mounts["data"].get("readOnly") and claims["data"]["claimName"] == "team-data"
    trainer = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    assert trainer["data"] == args.out, "the workers read what the Job wrote"
    assert "data.prepare.enabled needs" in render_error(helm, *sets[:3], "data.prepare.enabled=true")
    assert not [doc for doc in by_kind(render(helm), "Job") if doc["metadata"]["name"].endswith("-prepare-data")]
