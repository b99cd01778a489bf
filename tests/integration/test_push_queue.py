"""No push is lost, through a real Prefect server, worker and webhook receiver: pushes during a
running retrain queue behind it (ENQUEUE), the queued runs resolve the channel when they start, so
a superseded push is not trained twice and the newest is; a push-triggered run that ends
Cancelled is alerted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, write_dataset
from tests.integration.prefect_stack import Stack

pytestmark = pytest.mark.integration

PATTERN = ["0", "4", "6 4", "2 5"]


def push_new_dataset(stack: Stack, root: Path, first_id: int) -> dict[str, Any]:
    """Push a dataset no other test pushed (its own image ids), as a user does."""
    data = write_dataset(root / f"ds-{first_id}", {str(first_id + i): PATTERN[i % 4] for i in range(24)},
                         ["900", "901", "902"], size=40)
    pushed = subprocess.run([sys.executable, "-m", "protein.cli", "datasets", "push", "--data", str(data),
                             "--store", stack.store], env=stack.env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert pushed.returncode == 0, f"datasets push failed: {pushed.stdout}{pushed.stderr}"
    return json.loads(pushed.stdout)


def run_of(stack: Stack, push: dict[str, Any]) -> Any:
    return stack.wait_run("retrain/nightly",
                          lambda r: r.parameters.get("trigger_event") == f"protein.dataset.pushed {push['event_id']}",
                          f"for push #{push['sequence']}")


def resolved(client: Any, flow_run_id: Any) -> bool:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return any(t.name.startswith("resolve-data") and t.state is not None and t.state.is_completed() for t in tasks)


def test_pushes_during_a_retrain_queue_and_the_newest_is_trained_once(prefect_stack: Stack, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    stack = prefect_stack
    for name, value in stack.env.items():  # this process reads the stack's store at the end
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    base = 1000 + uuid.uuid4().int % 1000 * 100
    first = push_new_dataset(stack, tmp_path, base)
    running = run_of(stack, first)
    with stack.client() as client:
        deadline = time.monotonic() + 180
        while not resolved(client, running.id):  # it has taken its push: the next ones come during the run
            running = client.read_flow_run(running.id)
            assert time.monotonic() < deadline and not running.state.is_final(), f"first run: {running.state}"
            time.sleep(0.5)
        middle = push_new_dataset(stack, tmp_path, base + 30)
        newest = push_new_dataset(stack, tmp_path, base + 60)
        queued = [run_of(stack, middle), run_of(stack, newest)]
        still = client.read_flow_run(running.id)
        assert still.state_type.value == "RUNNING", f"inconclusive: first run ended early: {still.state}"
        for run in queued:  # waiting for the slot, not cancelled
            assert not client.read_flow_run(run.id).state.is_final(), client.read_flow_run(run.id).state
    ends = {name: stack.wait_final(run.id) for name, run in (("first", running), ("middle", queued[0]),
                                                                ("newest", queued[1]))}
    for name, run in ends.items():
        assert run.state.is_completed(), f"{name} run ended {run.state.name}: {run.state.message}\n{stack.logs()}"
    assert ends["middle"].state.message.startswith(f"nothing trained: push #{middle['sequence']} on channel "
                                                   f"'latest' was superseded by push #{newest['sequence']}")
    from protein.registry import Registry
    from protein.storage import open_store

    registry = Registry(open_store(stack.store))
    specs = registry.specs(registry.versions())
    trained = [spec["data_fingerprint"] for spec in specs.values()]
    assert trained.count(newest["fingerprint"]) == 1, "the newest push is trained exactly once"
    assert trained.count(middle["fingerprint"]) == 0, "the superseded push is not trained"
    assert trained.count(first["fingerprint"]) == 1


def test_a_cancelled_push_triggered_retrain_is_alerted(prefect_stack: Stack, tmp_path: Path) -> None:
    from prefect.states import Cancelling

    stack = prefect_stack
    pushed = push_new_dataset(stack, tmp_path, 3000 + uuid.uuid4().int % 1000 * 100)
    run = run_of(stack, pushed)
    with stack.client() as client:
        # Cancelled once its process runs, as an operator cancels a retrain they see running. Cancelled
        # at whatever state the run had reached, one run on a busy machine took 309 s to end (8 s
        # otherwise): the test's timing decided which of Prefect's cancellation paths it exercised.
        deadline = time.monotonic() + 180
        while (state := client.read_flow_run(run.id).state).type.value != "RUNNING":
            assert time.monotonic() < deadline and not state.is_final(), f"retrain never ran: {state}"
            time.sleep(0.2)
        client.set_flow_run_state(run.id, Cancelling(message="test: cancelled by hand"), force=True)
    run = stack.wait_final(run.id, timeout_s=120)
    assert run.state.type.value == "CANCELLED", run.state
    message = stack.receiver.wait_for(lambda m: str(run.id) in m.get("text", ""), f"about cancelled run {run.id}",
                                      describe=stack.logs)
    assert message["subject"] == f"protein: retrain run {run.name} Cancelled"
    assert "started by a dataset push, ended Cancelled" in message["text"]


def test_verify_refuses_a_deployment_that_holds_a_literal_placeholder(prefect_stack: Stack) -> None:
    from prefect.client.schemas.actions import DeploymentUpdate

    stack = prefect_stack
    verify = [sys.executable, "-m", "deployments.deploy", "--verify"]
    ok = subprocess.run(verify, env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0 and ok.stdout.startswith("verified 5 deployments"), f"{ok.stdout}{ok.stderr}"
    with stack.client() as client:
        # What a plain `prefect deploy` registers with PROTEIN_STORE unset.
        validate = client.read_deployment_by_name("validate/cpu")
        client.update_deployment(validate.id, DeploymentUpdate(
            parameters={**validate.parameters, "store": "{{ $PROTEIN_STORE }}"}))
        try:
            refused = subprocess.run(verify, env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=180)
        finally:
            client.update_deployment(validate.id, DeploymentUpdate(parameters=validate.parameters))
    assert refused.returncode == 2, f"{refused.stdout}{refused.stderr}"
    assert refused.stderr == ("deploy: deployment validate/cpu holds a literal placeholder (parameters.store: "
                              "{{ $PROTEIN_STORE }}): its variable was unset when it was deployed; deploy with "
                              "`python -m deployments.deploy`\n")


def test_verify_refuses_a_deployment_the_file_no_longer_defines(prefect_stack: Stack) -> None:
    """Renamed in prefect.yaml, the old deployment kept its schedule and trigger at an old commit: every
    run of it failed its deployment check, an alert a night, until someone deleted it by hand."""
    stack = prefect_stack
    verify = [sys.executable, "-m", "deployments.deploy", "--verify"]
    with stack.client() as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
        old = client.create_deployment(nightly.flow_id, "nightly-old", entrypoint=nightly.entrypoint,
                                       work_pool_name=nightly.work_pool_name, tags=["protein-pipeline", "retrain"])
        untagged = client.create_deployment(nightly.flow_id, "another-teams", entrypoint=nightly.entrypoint,
                                            work_pool_name=nightly.work_pool_name)
        try:
            refused = subprocess.run(verify, env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=180)
        finally:
            client.delete_deployment(old)
            client.delete_deployment(untagged)
    assert refused.returncode == 2, f"{refused.stdout}{refused.stderr}"
    err = refused.stderr
    assert err.startswith("deploy: deployment retrain/nightly-old (tagged protein-pipeline) is not in "), err
    assert "prefect deployment delete retrain/nightly-old" in refused.stderr and refused.stderr.count("\n") == 1
