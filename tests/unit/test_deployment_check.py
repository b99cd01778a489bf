"""The deployment check without a server: the API's answers played by a fake client, the retrain's
other steps by stand-ins. Against a real server: tests/integration/test_deployment_check.py."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed

import tasks.deployment_check as deployment_check
from tasks.deployment_check import DeploymentChanged, check_deployment


class ServerWithoutTheDeployment:
    def read_deployment_by_name(self, name: str) -> Any:
        raise ObjectNotFound(http_exc=None)  # type: ignore[arg-type]  # what the client raises on a 404; str() "None"


def test_a_deployment_missing_on_the_server_is_refused_in_one_line_and_not_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """score/gpu, defined in git but never deployed (or deleted): before, Prefect's ObjectNotFound,
    "None", was retried twice (5 s, 30 s) and failed the retrain with a traceback."""
    monkeypatch.setattr(deployment_check, "own_source", lambda: ("https://git.example.internal/protein.git", "1" * 40))
    monkeypatch.setattr(deployment_check, "get_client", lambda sync_client: nullcontext(ServerWithoutTheDeployment()))
    with pytest.raises(DeploymentChanged) as refused:
        check_deployment.fn("score/gpu")
    assert str(refused.value) == ("deployment score/gpu does not exist on the server; deploy it "
                                  "(deployments/prefect.yaml); nothing was dispatched")
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    assert not deployment_check._not_changed(check_deployment, None, Failed(data=refused.value)), "retried"


def test_the_retrain_refuses_a_changed_score_deployment_before_it_validates_or_dispatches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """train/gpu as defined, score/gpu not: before, the score deployment was first checked at the gate,
    after the GPU training; the run failed with nothing judged, and the next night trained again."""
    import logging

    import flows.retrain as retrain

    changed = DeploymentChanged("deployment score/gpu is not what prefect.yaml defines: work pool is 'cpu', "
                                "expected 'gpu'; nothing was dispatched to it")
    checked: list[str] = []

    def too_soon(*args: Any) -> None:
        raise AssertionError(f"validated or dispatched with the deployments checked so far: {checked}")

    def check(name: str) -> dict[str, Any]:
        checked.append(name)
        if name == "score/gpu":
            raise changed
        return {"deployment": name, "commit": "1" * 40}

    monkeypatch.setattr(retrain, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(retrain, "definition_gate_of_this_run", lambda: None)
    monkeypatch.setattr(retrain, "resolve_dataset", lambda *args: {"uri": "/data/ds", "channel": None,
                                                                    "trigger_sequence": None, "fingerprint": None})
    monkeypatch.setattr(retrain, "current_champion", lambda store: None)
    monkeypatch.setattr(retrain, "lost_after_refusal", lambda config: None)
    monkeypatch.setattr(retrain, "check_deployment", check)
    for step in ("validate_data", "preload", "dispatch_step", "train_model"):
        monkeypatch.setattr(retrain, step, too_soon)
    state = retrain.retrain.fn(data="/data/ds", store="/store", train_deployment="train/gpu",
                               score_deployment="score/gpu")
    assert state.is_failed() and state.message == str(changed), state
    assert checked == ["train/gpu", "score/gpu"]
