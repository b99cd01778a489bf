"""Failover of the highly available server (deployments/ha_stack/) in the middle of a retrain
that trains on the GPU pool: one API process SIGKILLed, then PostgreSQL restarted. Workers, the
CLI and this test talk to nginx only. The stack, its PostgreSQL and its S3 server belong to this
module: stopping them must not reach another module's server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployments.ha_stack import Postgres, running_postgres
from tests.conftest import set_s3_env
from tests.helpers import REPO, module_scratch, run_scratch
from tests.integration.prefect_services import Service, host_env, worker_args
from tests.integration.prefect_stack import RUN_TIMEOUT_S, Stack, start_stack, stop_stack

pytestmark = pytest.mark.integration

EPOCHS = 6  # long enough that the fault lands while the GPU host trains (each test asserts it did)
DB_DOWN_S = 5.0
# After a kill, how long nginx gets to log the responses it completed before it.
KILL_SETTLE_S = 1.0


@dataclass
class Failover:
    stack: Stack
    pg: Postgres
    gpu_root: Path


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failover]:
    from prefect.client.schemas.actions import DeploymentUpdate

    from tests.conftest import running_moto_server

    with module_scratch(tmp_path_factory, "failover") as tmp, running_moto_server() as s3, \
            running_postgres(template_cache=run_scratch(tmp_path_factory, "prefect-template")) as pg:
        stack = start_stack(tmp, s3, pg)
        try:
            gpu_root = tmp / "gpu-host"
            env = host_env(stack.env, gpu_root, {"PROTEIN_ALLOW_CPU": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"})
            stack.services.append(Service("worker-gpu", worker_args("gpu", "gpu-host"), env, tmp, cwd=gpu_root))
            with stack.client() as client:
                nightly = client.read_deployment_by_name("retrain/nightly")
                # Training on the GPU pool (the stack's default trains inside the retrain run).
                client.update_deployment(nightly.id, DeploymentUpdate(parameters={
                    **nightly.parameters, "train_deployment": "train/gpu",
                    "train": {**nightly.parameters["train"], "epochs": EPOCHS},
                    "dispatch": {"timeout_minutes": 10, "attempts": 3, "poll_seconds": 1}}))
            yield Failover(stack, pg, gpu_root.resolve())
        finally:
            stop_stack(stack)


def train_runs(stack: Stack, parent_id: Any) -> list[Any]:
    """The train/gpu runs one retrain dispatched, oldest first."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with stack.client() as client:
        deployment = client.read_deployment_by_name("train/gpu")
        parent_tasks = {t.id for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_id])))}
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return [r for r in runs if r.parent_task_run_id in parent_tasks]


def wait_training(stack: Stack, parent_id: Any) -> Any:
    """The GPU-pool train run once it has checkpointed an epoch; fails if it already finished."""
    from protein.storage import open_store

    store = open_store(stack.store)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs = [r for r in train_runs(stack, parent_id) if r.state_type.value == "RUNNING"]
        if runs and any(key.endswith("/checkpoint.pt") and runs[0].parameters["run_id"] in key
                        for key in store.list("runs/")):
            return runs[0]
        assert time.monotonic() < deadline, f"training did not start in time\n{stack.logs()}"
        with stack.client() as client:
            parent = client.read_flow_run(parent_id)
        assert not parent.state.is_final(), f"the retrain ended before training was caught: {parent.state}"
        time.sleep(1)  # a gentle poll: the S3 server is one process, and the GPU host uploads to it


def epochs_trained(stack: Stack, train: Any) -> int:
    """Epochs the train run has checkpointed and recorded so far (its metrics.jsonl)."""
    from protein.modeling.checkpoints import metrics_key
    from protein.storage import open_store

    return len(open_store(stack.store).get_bytes(metrics_key(train.parameters["run_id"])).splitlines())


def assert_mid_training(stack: Stack, train: Any) -> None:
    done = epochs_trained(stack, train)
    assert done < EPOCHS, f"the fault landed after training finished ({done} of {EPOCHS}); the test proves nothing"


def left_unfinished(stack: Stack) -> list[str]:
    """Flow and task runs that are Running or Pending anywhere on the server."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    live = [StateType.RUNNING, StateType.PENDING]
    with stack.client() as client:
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))))
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=live))))
    return [f"flow run {r.name}: {r.state_type.value}" for r in flows] + \
        [f"task run {r.name}: {r.state_type.value}" for r in tasks]


def test_api_process_killed_mid_training_the_run_completes_through_the_other(
    failover: Failover, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = failover.stack
    set_s3_env(monkeypatch, stack.env["AWS_ENDPOINT_URL"])
    # The module's other test may have promoted already (random order); this one asserts the
    # promotion's events and alert, so it starts from a store without a champion.
    stack.without_champion()
    pushed = subprocess.run([sys.executable, "-m", "protein.cli", "datasets", "push", "--data", str(stack.dataset),
                             "--store", stack.store], env=stack.env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert pushed.returncode == 0, f"datasets push failed: {pushed.stdout}{pushed.stderr}"
    event_id = json.loads(pushed.stdout)["event_id"]
    # The trigger names the channel; this push's own event started the run.
    run = stack.wait_run("retrain/nightly", lambda r: r.parameters.get("data") == "channel:latest"
                         and r.parameters.get("trigger_event") == f"protein.dataset.pushed {event_id}",
                         "started by the push")
    train = wait_training(stack, run.id)

    both = {api.port for api in stack.ha.apis}
    assert stack.ha.upstream_ports_used() == both, "nginx balanced over both APIs before the kill"
    access_log = stack.ha.root / "nginx-access.log"
    killed = stack.ha.kill_api(0)
    assert not killed.alive()
    # Counted once the process is gone and nginx has logged what it answered before: a response it
    # completed a moment before the kill is logged a moment after it, and is not one "answered by
    # the killed API" (counted before the kill, such a line failed the test now and then).
    time.sleep(KILL_SETTLE_S)
    seen_at_kill = len(access_log.read_text().splitlines())
    assert_mid_training(stack, train)
    [survivor] = stack.ha.apis

    run = stack.wait_final(run.id)
    assert run.state.is_completed(), f"retrain ended {run.state.name}: {run.state.message}\n{stack.logs()}"
    with stack.client() as client:
        train = client.read_flow_run(train.id)
    assert train.state.is_completed(), f"the train run the kill interrupted ended {train.state.name}"
    after = access_log.read_text().splitlines()[seen_at_kill:]
    served = [line.split(" ", 2) for line in after]
    assert any(addr == f"127.0.0.1:{survivor.port}" and status.startswith("2") for addr, status, _ in served)
    assert not any(addr == f"127.0.0.1:{killed.port}" and status.startswith("2") for addr, status, _ in served), \
        "a request was answered by the killed API"

    # No event lost: the run's events reached the services process through Redis, and the
    # promotion automation posted its alert.
    vocabulary = {"protein.validation.passed", "protein.model.promoted", "protein.submission.written"}
    emitted = stack.wait_events("protein.", f"prefect.flow-run.{run.id}", vocabulary)
    assert vocabulary <= set(emitted), sorted(emitted)
    # The GPU host registered the model while the other API was already dead.
    registered = stack.wait_events("protein.", f"prefect.flow-run.{train.id}", {"protein.model.registered"})
    assert "protein.model.registered" in registered, sorted(registered)
    champion = emitted["protein.model.promoted"]["payload"]["version"]
    stack.receiver.wait_for(lambda m: f"model {champion} promoted" in m.get("text", ""),
                            f"about {champion}'s promotion", describe=stack.logs)
    assert not left_unfinished(stack), left_unfinished(stack)
    stack.ha.replace_killed_apis()


def test_postgres_restarted_mid_training_the_run_completes_or_is_redispatched(
    failover: Failover, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, pg = failover.stack, failover.pg
    set_s3_env(monkeypatch, stack.env["AWS_ENDPOINT_URL"])
    with stack.client() as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
        run = client.create_flow_run_from_deployment(nightly.id, parameters={"data": str(stack.dataset)})
    train = wait_training(stack, run.id)

    pg.stop()
    assert_mid_training(stack, train)
    time.sleep(DB_DOWN_S)
    pg.start()  # on the same port: every process keeps its database URL

    run = stack.wait_final(run.id)
    assert run.state.is_completed(), f"retrain ended {run.state.name}: {run.state.message}\n{stack.logs()}"
    attempts = train_runs(stack, run.id)
    assert attempts[-1].state.is_completed()
    for attempt in attempts[:-1]:  # re-dispatched after a clear message, never silently
        assert attempt.state.message, f"{attempt.name} ended {attempt.state.name} without a message"
    # Task-run states reach the database through events (the services process records them), a
    # moment after the flow run's own final state.
    deadline = time.monotonic() + 90
    while (unfinished := left_unfinished(stack)) and time.monotonic() < deadline:
        time.sleep(2)
    assert not unfinished, f"{unfinished}\n{stack.logs()}"
