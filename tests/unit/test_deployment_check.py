"""check_deployment's refusals that need no server: the API's answers are played by a fake client.
Against a real server: tests/integration/test_deployment_check.py."""

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
