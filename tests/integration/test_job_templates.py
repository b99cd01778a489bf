"""The Kubernetes and Docker GPU work-pool templates (deployments/pools/) rendered for a flow run
of train/gpu the way a worker renders them: the integration's job configuration class built from
the template and the deployment's job variables (from_template_and_values, against a real Prefect
API), then prepare_for_flow_run. What a cluster would receive is checked, not the JSON file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.pools import IMAGE_SETTING, ImageSettingError, base_job_template, worker_image
from tests.conftest import ProteinProcess
from tests.helpers import REPO

pytestmark = [pytest.mark.integration]

IMAGE = "registry.example.com/protein-worker:1.4.0-cuda"
DIGEST_IMAGE = "registry.example.com:5000/protein-worker@sha256:" + "ab" * 32
# What must never reach a manifest: the store's keys (values and variable names).
CREDENTIAL_MARKERS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "testing-secret")


def train_gpu_job_variables() -> dict[str, Any]:
    """The job variables deployments/prefect.yaml gives train/gpu (its command and env), placeholders filled."""
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    [train] = [d for d in spec["deployments"] if d["entrypoint"].startswith("flows/train.py")
               and d["work_pool"]["name"] == "gpu"]
    env = {k: v.replace("{{ $PROTEIN_STORE }}", "s3://bucket/prod") for k, v in
           train["work_pool"]["job_variables"]["env"].items()}
    return {"command": train["work_pool"]["job_variables"]["command"], "env": env}


def flow_run() -> Any:
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name="clever-heron", flow_id=uuid.uuid4(), deployment_id=uuid.uuid4())


def render(kind: str, image: str) -> Any:
    if kind == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as Configuration
    else:
        from prefect_docker.worker import DockerWorkerJobConfiguration as Configuration
    configuration = asyncio.run(Configuration.from_template_and_values(base_job_template(kind, image),
                                                                       train_gpu_job_variables()))
    configuration.prepare_for_flow_run(flow_run())
    return configuration


def assert_no_credentials(rendered: Any) -> None:
    text = json.dumps(rendered, default=str)
    found = [marker for marker in CREDENTIAL_MARKERS if marker in text]
    assert not found, f"credentials in the rendered job: {found}"


def test_kubernetes_job_requests_one_gpu_and_reads_the_store_keys_from_a_secret(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deploying shell that holds keys must not leak them into the job.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    manifest = render("kubernetes", worker_image({IMAGE_SETTING: IMAGE})).job_manifest
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == IMAGE
    assert container["envFrom"] == [{"secretRef": {"name": "protein-store-credentials"}}]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["PROTEIN_REQUIRE_CUDA"] == "1" and env["PROTEIN_STORE"] == "s3://bucket/prod"
    assert "PREFECT__FLOW_RUN_ID" in env, "the job runs this flow run"
    # The image's entrypoint starts a worker; the job runs the flow run instead, in one process.
    assert container["command"] == ["/usr/bin/env"]
    assert container["args"][:3] == ["python", "-m", "prefect.engine"]
    # A finished Job's pod keeps its node's ephemeral storage (an in-pod cache) until deleted.
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600
    assert_no_credentials(manifest)


def test_docker_container_requests_one_gpu_and_carries_no_credentials(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    configuration = render("docker", worker_image({IMAGE_SETTING: DIGEST_IMAGE}))
    assert configuration.image == DIGEST_IMAGE
    assert configuration.container_create_kwargs["device_requests"] == [{"count": 1, "capabilities": [["gpu"]]}]
    assert configuration.container_create_kwargs["entrypoint"] == ["/usr/bin/env"]
    assert configuration.command.startswith("python -m prefect.engine")
    assert configuration.env["PROTEIN_REQUIRE_CUDA"] == "1"
    # Off: prefect-docker may read a removed container's exit code from its last snapshot (0), and a
    # training killed for memory would not be Crashed with its code (docs/runbook.md: prune on a timer).
    assert configuration.auto_remove is False
    assert_no_credentials(configuration.model_dump(mode="json"))


@pytest.mark.parametrize(("image", "complaint"), [
    ("", "is not set"),
    ("registry.example.com/protein-worker", "is not pinned"),
    ("registry.example.com:5000/protein-worker", "is not pinned"),
    ("registry.example.com/protein-worker:latest", "`latest` moves"),
    ("protein-worker@sha256:abc", "is not pinned"),
])
def test_the_worker_image_must_be_pinned(image: str, complaint: str) -> None:
    with pytest.raises(ImageSettingError, match=complaint):
        worker_image({IMAGE_SETTING: image})


def test_pools_cli_prints_the_template_or_one_line_and_exit_2(tmp_path: Path, protein_process: ProteinProcess) -> None:
    def cli(image: str) -> subprocess.CompletedProcess[str]:
        return protein_process.module("deployments.pools", "kubernetes", cwd=REPO, timeout=60,
                                      env={"PATH": "/usr/bin:/bin", IMAGE_SETTING: image})

    printed = cli(IMAGE)
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["variables"]["properties"]["image"]["default"] == IMAGE
    refused = cli("protein-worker")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"error: {IMAGE_SETTING}='protein-worker' is not pinned: give a tag or @sha256: digest"]


def test_worker_image_starts_a_worker_and_the_templates_replace_that_entrypoint() -> None:
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    [entrypoint] = [line for line in dockerfile if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == ["prefect", "worker", "start"]
    assert any(line.strip().startswith("cpu)") for line in dockerfile), "a CPU variant"
    assert any(line.strip().startswith("cuda)") for line in dockerfile), "a CUDA variant"
    kubernetes = base_job_template("kubernetes", IMAGE)["job_configuration"]["job_manifest"]
    assert kubernetes["spec"]["template"]["spec"]["containers"][0]["command"] == ["/usr/bin/env"]
    docker = base_job_template("docker", IMAGE)["variables"]["properties"]["container_create_kwargs"]
    assert docker["default"]["entrypoint"] == ["/usr/bin/env"]
