"""Production across machines, made on one: a CPU host and a GPU host that share nothing but
an S3 bucket (a real moto_server) and a Prefect server (a real `prefect server start`).

Each worker "host" runs in its own empty directory with its own HOME, PREFECT_HOME, cache and
TMPDIR and without PYTHONPATH; the workers share the project's virtualenv (installed
dependencies, as every real host has its own) but get the code from the deployments' pull
step: a git clone of a bare repository made from this checkout. `python -m deployments.deploy`
runs from a separate clone that is deleted right after, and the dataset's local folder is
deleted after `protein datasets push`, so the only way to the data is its s3:// URI.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.liveness import HEARTBEAT_ONLY_BOUND_S, LOWEST_LOST_AFTER_S, WORKER_NAME_LABEL
from tests.conftest import set_s3_env
from tests.integration.gpu_cluster import IMAGE, TEST_IDS, Cluster
from tests.integration.prefect_services import all_logs, processes_under, wait_final

pytestmark = pytest.mark.integration
# The cluster (tests/integration/gpu_cluster.py) is the session's, shared with test_dispatch_faults.py.

RUN_TIMEOUT_S = 420.0


@pytest.fixture
def client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    set_s3_env(monkeypatch, cluster.env["AWS_ENDPOINT_URL"])  # this process reads the store too
    with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}), get_client(sync_client=True) as c:
        yield c


def retrain_parameters(cluster: Cluster, store: str, epochs: int) -> dict[str, Any]:
    return {
        "data": cluster.data_uri,
        "store": store,
        "train": {"epochs": epochs, "image_size": IMAGE, "batch_size": 8, "share_cache": True},
        "validation": {"image_size": IMAGE},
        "gate_config": {"min_score": 0.0},
        "dispatch": {"timeout_minutes": 10, "attempts": 3, "poll_seconds": 1},
    }


def train_runs(client: Any, parent_id: Any, deployment: str = "train/gpu") -> list[Any]:
    """Runs of `deployment` dispatched by one retrain run, oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deployed = client.read_deployment_by_name(deployment)
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed.id])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    parent_tasks = {t.id for t in task_runs(client, parent_id)}
    return [r for r in runs if r.parent_task_run_id in parent_tasks]


def task_runs(client: Any, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def run_logs(client: Any, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs: list[Any] = []
    while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=len(logs)):
        logs += batch
    return logs


def test_retrain_trains_on_the_gpu_host_from_a_clone_and_reuses_shared_caches(
    cluster: Cluster, client: Any
) -> None:
    from protein.registry import Registry
    from protein.storage import open_store

    # What deploy registered: code pinned to a commit, one retrain at a time, one run per GPU slot.
    nightly = client.read_deployment_by_name("retrain/nightly")
    assert nightly.pull_steps == [{"prefect.deployments.steps.git_clone": {
        "repository": nightly.pull_steps[0]["prefect.deployments.steps.git_clone"]["repository"],
        "commit_sha": cluster.commit}}], nightly.pull_steps
    assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options is not None and nightly.concurrency_options.collision_strategy == "ENQUEUE"
    assert client.read_work_pool("gpu").concurrency_limit == 1
    for name in ("train/gpu", "score/gpu"):
        on_gpu = client.read_deployment_by_name(name)
        assert on_gpu.work_pool_name == "gpu", name
        assert on_gpu.job_variables["env"]["PROTEIN_REQUIRE_CUDA"] == "1", name
        assert on_gpu.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "protein", name
    assert nightly.parameters["score_deployment"] == "score/gpu"

    _, gpu_dir = cluster.gpu_host("gpu-host-a")
    store_uri = f"s3://{cluster.bucket}/first"
    first = client.create_flow_run_from_deployment(nightly.id, parameters=retrain_parameters(cluster, store_uri, 1))
    first = wait_final(client, first.id, RUN_TIMEOUT_S, cluster.services)
    assert first.state.is_completed(), f"retrain ended {first.state.name}: {first.state.message}\n" \
                                       f"{all_logs(cluster.services)}"
    assert first.work_pool_name == "cpu"
    [train] = train_runs(client, first.id)
    assert train.state.is_completed() and train.work_pool_name == "gpu"

    logs = run_logs(client, train.id)
    [code_line] = [log.message for log in logs if log.message.startswith("train flow code: ")]
    code = Path(code_line.removeprefix("train flow code: "))
    assert code.is_relative_to(gpu_dir), f"the train flow ran from {code}, not from inside {gpu_dir}"
    assert any(log.name.startswith("protein.") for log in logs), "library logs reach the Prefect API"
    decoded = list((gpu_dir / "cache").rglob("*.npy"))
    assert decoded, f"no decode cache in the gpu host's own cache dir {gpu_dir / 'cache'}"

    # Scoring ran where the GPU is: the gate's evaluation, then the test set, both on the gpu host;
    # the CPU host decoded no split: it only spot-checks a few rows (protein/evidence.py), decoding
    # those images itself and scoring them with the registered weights, which it therefore holds.
    scored = train_runs(client, first.id, "score/gpu")
    assert [r.parameters["step"] for r in scored] == ["gate", "predict"], [r.name for r in scored]
    for run in scored:
        assert run.state.is_completed() and run.work_pool_name == "gpu", (run.name, run.state.name)
        assert run.labels.get(WORKER_NAME_LABEL) == "gpu-host-a", run.labels
        assert run.parameters["run_id"] == train.parameters["run_id"]
    assert list((gpu_dir / "cache" / "models").iterdir()), "the gpu host downloaded the models it scored"
    cpu_cache = cluster.root / "cpu-host" / "cache"
    assert not list(cpu_cache.rglob("*.npy")), "the CPU host decoded a whole split"

    store = open_store(store_uri)
    registry = Registry(store)
    champion = registry.champion().champion
    assert champion is not None and registry.find_by_run(train.parameters["run_id"]) == champion
    assert scored[0].parameters["model"] == champion and scored[1].parameters["model"] == champion
    latest = json.loads(store.get_bytes("submissions/latest.json"))
    assert latest["model_id"] == champion
    lines = store.get_bytes(latest["key"]).decode().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == TEST_IDS
    # What the gpu host computed under the run is exactly what the CPU host published.
    assert store.get_bytes(latest["key"]) == store.get_bytes(f"runs/{train.parameters['run_id']}/submission.csv")

    # Unchanged data, a fresh GPU host: the GPU host pulls the decoded images the first one pushed
    # to the store instead of decoding.
    _, gpu_dir_b = cluster.gpu_host("gpu-host-b")
    second = client.create_flow_run_from_deployment(nightly.id, parameters=retrain_parameters(cluster, store_uri, 1))
    started_by = time.monotonic() + RUN_TIMEOUT_S
    while (second := client.read_flow_run(second.id)).state_type.value not in ("RUNNING", "COMPLETED", "FAILED",
                                                                               "CRASHED", "CANCELLED"):
        assert time.monotonic() < started_by, f"the second nightly never started\n{all_logs(cluster.services)}"
        time.sleep(0.5)
    # A nightly started while one runs waits for the slot (ENQUEUE), never cancelled; it is cancelled
    # here, while it waits, only to keep this test short.
    from prefect.states import Cancelled

    third = client.create_flow_run_from_deployment(nightly.id, parameters=retrain_parameters(cluster, store_uri, 1))
    deadline = time.monotonic() + 60
    while (third := client.read_flow_run(third.id)).state.name != "AwaitingConcurrencySlot":
        assert time.monotonic() < deadline and not third.state.is_final(), f"concurrent nightly: {third.state}"
        time.sleep(0.5)
    assert client.read_flow_run(second.id).state_type.value == "RUNNING", "the first one still held the slot"
    client.set_flow_run_state(third.id, Cancelled(message="test: queued run not needed"), force=True)
    second = wait_final(client, second.id, RUN_TIMEOUT_S, cluster.services)
    assert second.state.is_completed(), f"{second.state.message}\n{all_logs(cluster.services)}"

    # The promotion moved the drift reference to the champion's training data, and the reference's
    # hash is part of the validation cache key: the second run validates once more, against it.
    [validation] = [t for t in task_runs(client, second.id) if t.name.startswith("validate-data")]
    assert validation.state.name == "Completed", f"validation against the new reference: {validation.state.name}"
    data_fingerprint = registry.spec(champion)["data_fingerprint"]
    report = json.loads(store.get_bytes(f"validation/{data_fingerprint}/report.json"))
    assert report["reference"]["model_id"] == champion, report["reference"]
    [train_b] = train_runs(client, second.id)
    messages = [log.message for log in run_logs(client, train_b.id)]
    assert any(m.startswith("image cache pulled from s3://") for m in messages), messages
    assert list((gpu_dir_b / "cache").rglob("*.npy")), "the pulled cache lands in the new host's own directory"


# The lowest `dispatch.lost_after_seconds` accepted (the test servers persist events every second); runs
# pulse four times in it.
LOST_AFTER_S = LOWEST_LOST_AFTER_S


def assert_lost_on_pulses(message: str | None) -> None:
    """The lost run was called lost on the silence of its pulses: over the bound, under the 45 s
    that a run heard only through Prefect's heartbeats gets."""
    found = re.match(r"flow run stopped heartbeating \(none for (\d+)s", message or "")
    assert found, message
    assert LOST_AFTER_S <= int(found[1]) < HEARTBEAT_ONLY_BOUND_S, message  # the message rounds the silence


def test_gpu_worker_killed_mid_training_is_replaced_and_the_run_resumes(cluster: Cluster, client: Any) -> None:
    from protein.registry import Registry
    from protein.storage import open_store

    epochs = 6
    worker, worker_dir = cluster.gpu_host("gpu-host-c")
    store_uri = f"s3://{cluster.bucket}/killed"
    store = open_store(store_uri)
    nightly = client.read_deployment_by_name("retrain/nightly")
    parameters = retrain_parameters(cluster, store_uri, epochs)
    # The lowest bound accepted instead of the default 120 s: the run pulses every 2.5 s for it
    # (tasks.liveness); the silence after the kill was most of this test's time.
    parameters["dispatch"]["lost_after_seconds"] = LOST_AFTER_S
    parent = client.create_flow_run_from_deployment(nightly.id, parameters=parameters)

    # Kill the GPU host as soon as training has checkpointed its first epoch.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (checkpoints := [k for k in store.list("runs/") if k.endswith("/checkpoint.pt")]):
        assert time.monotonic() < deadline, f"no checkpoint in time\n{all_logs(cluster.services)}"
        assert client.read_flow_run(parent.id).state_type.value not in ("COMPLETED", "FAILED", "CRASHED")
        time.sleep(0.2)
    running = processes_under(worker_dir)
    worker.kill(worker_dir)
    assert not set(processes_under(worker_dir)) & set(running), "the GPU host's processes are gone"
    import torch

    [checkpoint] = checkpoints
    killed_at = torch.load(__import__("io").BytesIO(store.get_bytes(checkpoint)), weights_only=True)["epoch"]
    assert killed_at < epochs, "the kill landed after training finished; the test proves nothing then"

    cluster.gpu_host("gpu-host-d")  # the replacement host
    parent = wait_final(client, parent.id, RUN_TIMEOUT_S, cluster.services)
    assert parent.state.is_completed(), f"{parent.state.message}\n{all_logs(cluster.services)}"

    first, second = train_runs(client, parent.id)
    # Marked Crashed by the dispatch's liveness check, on the silence of the run's pulses: a run heard
    # only through Prefect's 30 s heartbeats is never called lost before 45 s of silence.
    assert first.state.type.value == "CRASHED", first.state
    assert_lost_on_pulses(first.state.message)
    # Its training task died with it: Crashed too, not Running for ever (Prefect cleans up after
    # Cancelled flow runs only).
    first_tasks = {t.name: t.state for t in task_runs(client, first.id)}
    train_task = next(state for name, state in first_tasks.items() if name.startswith("train-model"))
    assert train_task.type.value == "CRASHED" and "its flow run was lost" in train_task.message, first_tasks
    assert not [n for n, st in first_tasks.items() if st.type.value in ("PENDING", "RUNNING")], first_tasks
    assert second.state.is_completed()
    assert first.parameters["run_id"] == second.parameters["run_id"]
    messages = [log.message for log in run_logs(client, second.id)]
    resumed = [m for m in messages if m.startswith("resuming run ")]
    assert resumed, messages
    resumed_epoch = int(resumed[0].rsplit(" ", 1)[1])
    assert killed_at <= resumed_epoch < epochs, (killed_at, resumed_epoch)

    # Two attempts of one result: one key prefix (step, run id, deployment and parameters), two numbers.
    prefix = first.idempotency_key.removesuffix("-attempt-1")
    assert second.idempotency_key == f"{prefix}-attempt-2", (first.idempotency_key, second.idempotency_key)

    registry = Registry(store)
    [version] = registry.versions()
    assert registry.find_by_run(second.parameters["run_id"]) == version == registry.champion().champion
    assert [h["epoch"] for h in registry.spec(version)["history"]] == list(range(1, epochs + 1))
