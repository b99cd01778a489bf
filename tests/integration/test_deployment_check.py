"""The retrain dispatches only to a deployment that is still what deployments/prefect.yaml defines.

A real (temporary) Prefect server holds a retrain deployment and a train/gpu deployment registered
as `prefect deploy` registers them (entrypoint, one git_clone pull step, work pool). The retrain
runs in this process as a run of its deployment, exactly as a worker runs it (flow_engine.run_flow
with the run the server created), so it knows its own pull step. Then train/gpu is changed through
the API, as anyone holding the one Prefect credential can, and the retrain refuses with one line.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.definition import GIT_CLONE
from flows.params import DispatchParams, GateParams, TrainParams, ValidationParams
from tests.helpers import write_dataset

pytestmark = pytest.mark.integration

REPOSITORY = "https://git.example.internal/protein-pipeline.git"
COMMIT = "1" * 40


def pull(repository: str = REPOSITORY, commit: str = COMMIT) -> list[dict[str, Any]]:
    return [{GIT_CLONE: {"repository": repository, "commit_sha": commit}}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    return str(write_dataset(tmp_path_factory.mktemp("check") / "ds", labels, ["900", "901", "902"], size=40))


@pytest.fixture
def deployments(prefect_harness: None) -> Iterator[dict[str, Any]]:
    """retrain/nightly on the cpu pool and train/gpu on the gpu pool, both as the definition has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            with contextlib.suppress(ObjectAlreadyExists):  # made by another test of this session
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        ids = {}
        for flow, name, entrypoint, pool in (("retrain", "nightly", "flows/retrain.py:retrain", "cpu"),
                                             ("train", "gpu", "flows/train.py:train", "gpu")):
            flow_id = client.create_flow_from_name(flow)
            ids[flow] = client.create_deployment(flow_id, name, entrypoint=entrypoint, work_pool_name=pool,
                                                 pull_steps=pull())
        yield {"ids": ids, "train": "train/gpu", "client": client}
        for deployment_id in ids.values():
            client.delete_deployment(deployment_id)


def run_retrain(deployments: dict[str, Any], dataset: str, store: Path) -> Any:
    """The retrain as its deployment's worker runs it: the server's flow run, executed here."""
    from prefect.flow_engine import run_flow

    from flows.retrain import retrain

    parameters = {"data": dataset, "store": str(store), "train": TrainParams(epochs=1, image_size=32, batch_size=8),
                  "gate_config": GateParams(min_score=0.0), "validation": ValidationParams(image_size=40),
                  "train_deployment": deployments["train"],
                  "dispatch": DispatchParams(timeout_minutes=0.05, attempts=1, poll_seconds=0.5)}
    client = deployments["client"]
    flow_run = client.create_flow_run_from_deployment(deployments["ids"]["retrain"])
    return run_flow(retrain, flow_run=client.read_flow_run(flow_run.id), parameters=parameters,
                    return_type="state")


def train_runs(deployments: dict[str, Any]) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployments["ids"]["train"]]))
    return deployments["client"].read_flow_runs(deployment_filter=deployment)


@pytest.mark.parametrize(("change", "named"), [
    ({"pull_steps": pull(commit="2" * 40)}, f"pull step is ('{REPOSITORY}', '{'2' * 40}'), expected a git clone of "
                                            f"{REPOSITORY} at {COMMIT}"),
    ({"pull_steps": pull(repository="https://evil.example/fork.git")}, "pull step is ('https://evil.example/fork.git'"),
    ({"entrypoint": "flows/score.py:score"}, "entrypoint is 'flows/score.py:score', expected 'flows/train.py:train'"),
    ({"work_pool_name": "cpu"}, "work pool is 'cpu', expected 'gpu'"),
])
def test_a_deployment_changed_through_the_api_is_refused(deployments: dict[str, Any], dataset: str, tmp_path: Path,
                                                         change: dict[str, Any], named: str) -> None:
    from prefect.client.schemas.actions import DeploymentUpdate

    deployments["client"].update_deployment(deployments["ids"]["train"], DeploymentUpdate(**change))
    state = run_retrain(deployments, dataset, tmp_path / "store")
    assert state.is_failed(), state
    assert state.message.startswith(f"deployment {deployments['train']} is not what prefect.yaml defines: ")
    assert named in state.message and state.message.endswith("nothing was dispatched to it"), state.message
    assert "\n" not in state.message
    assert train_runs(deployments) == [], "nothing may be dispatched to a changed deployment"


def test_a_deployment_as_defined_is_dispatched_to(deployments: dict[str, Any], dataset: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: unchanged, the check passes and the run is dispatched (no gpu worker here, so it never
    starts and the retrain fails saying so, not naming the deployment as changed). With no score
    deployment the run scores the challenger itself, so it loads torch while it waits, and matplotlib for
    its gate report (protein.preload)."""
    from protein.preload import GATE_REPORT_MODULES, SCORING_MODULES

    preloaded: list[tuple[str, ...]] = []
    monkeypatch.setattr("flows.retrain.preload", lambda modules: preloaded.append(tuple(modules)))
    state = run_retrain(deployments, dataset, tmp_path / "store")
    assert state.is_failed() and "never started" in state.message, state.message
    assert len(train_runs(deployments)) == 1
    assert preloaded == [SCORING_MODULES + GATE_REPORT_MODULES]


def test_a_deployment_git_does_not_define_is_refused(deployments: dict[str, Any], dataset: str, tmp_path: Path) -> None:
    client = deployments["client"]
    flow_id = client.create_flow_from_name("train")
    extra = client.create_deployment(flow_id, "elsewhere", entrypoint="flows/train.py:train", work_pool_name="gpu",
                                     pull_steps=pull())
    try:
        deployments["train"] = "train/elsewhere"
        state = run_retrain(deployments, dataset, tmp_path / "store")
    finally:
        client.delete_deployment(extra)
    assert state.is_failed() and state.message == ("deployment train/elsewhere is not defined in "
                                                   "deployments/prefect.yaml; nothing was dispatched to it"), state


def retrain_logs(client: Any, flow_run_id: Any) -> list[str]:
    """The run's logs as the server keeps them, once its last line (the final state) arrived: logs
    reach the API in batches."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 60
    while True:
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        if any("Finished in state" in m for m in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


@pytest.mark.parametrize("by_automation", [True, False])
def test_a_run_an_automation_started_takes_the_gate_from_git(deployments: dict[str, Any], tmp_path: Path,
                                                            by_automation: bool) -> None:
    """The server marks runs an automation (a deployment trigger) creates; such a run given a lenient gate
    through the API uses deployments/prefect.yaml's gate instead. A run a person starts keeps its own."""
    import base64

    from prefect.flow_engine import run_flow

    from flows.retrain import retrain

    client = deployments["client"]
    headers = {"Prefect-Automation-ID": str(uuid.uuid4()),
               "Prefect-Automation-Name": base64.b64encode(b"protein-retrain-on-push").decode()}
    response = client._client.post(f"/deployments/{deployments['ids']['retrain']}/create_flow_run",
                                   json={"parameters": {}}, headers=headers if by_automation else {})
    response.raise_for_status()
    flow_run = client.read_flow_run(response.json()["id"])
    assert (flow_run.created_by is not None) is by_automation
    # Data that does not exist: the run fails at validation, after the gate's settings were chosen.
    state = run_flow(retrain, flow_run=flow_run, return_type="state",
                     parameters={"data": str(tmp_path / "missing"), "store": str(tmp_path / "store"),
                                 "gate_config": GateParams(min_score=0.0), "allow_older_data": True})
    assert state.is_failed()
    logs = retrain_logs(client, flow_run.id)
    chose = [m for m in logs if "it uses deployments/prefect.yaml's" in m]
    # Promoting older data is a person's decision: an automation's run given the flag through the API drops it.
    older = [m for m in logs if "was given allow_older_data; it is off" in m]
    if by_automation:
        assert len(chose) == 1 and "'min_score': 0.0" in chose[0], chose
        assert f"'min_score': {GateParams().min_score}" in chose[0], chose
        assert len(older) == 1, logs
    else:
        assert chose == [] and older == []
