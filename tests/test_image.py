"""The built image: its help, and a 2-process training run inside one locked-down container."""

from __future__ import annotations

import json

import pytest
from test_e2e_docker import IMAGE, docker, docker_ready

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures(docker_ready.__name__)]


def test_image_help():
    proc = docker("run", "--rm", "--entrypoint", "fsdp-train", IMAGE, "--help")
    assert "train" in proc.stdout and "local" in proc.stdout and "ckpt" in proc.stdout
    launch = docker("run", "--rm", IMAGE, "--help")  # the entrypoint: fsdp-train launch
    assert "torchrun" in launch.stdout


# The image's own user, and an arbitrary uid in group 0 with no passwd entry (what OpenShift's
# restricted SCC runs a pod as when the chart leaves podSecurityContext.runAsUser unset).
USERS = [None, "1000680000:0"]


@pytest.mark.parametrize("user", USERS, ids=["image-user", "arbitrary-uid"])
def test_two_process_training_in_one_container(user):
    as_user = ["--user", user] if user else []
    uid = docker("run", "--rm", *as_user, "--entrypoint", "id", IMAGE, "-u").stdout.strip()
    assert uid == (user.split(":")[0] if user else "10001"), "the image must run as a non-root user"
    script = ("fsdp-train local --nproc 2 --max-steps 12 --checkpoint-every 5 --checkpoint-dir /tmp/ck "
              "&& fsdp-train ckpt list /tmp/ck --json")
    proc = docker("run", "--rm", *as_user, "--read-only", "--tmpfs", "/tmp:exec,mode=1777", "--cap-drop", "ALL",
                  "--security-opt", "no-new-privileges", "--entrypoint", "sh", IMAGE, "-c", script, timeout=300)
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    assert [(r["step"], r["world_size"], r["committed"]) for r in rows] == [(5, 2, True), (10, 2, True), (12, 2, True)]
