"""deployments/definition.py: what a deployment must look like, and whose gate settings a run uses."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from deployments.definition import (
    GIT_CLONE,
    definition_gate,
    deployment_problems,
    expected_deployment,
    git_clone_source,
    load_definition,
    started_by,
)

REPO, SHA = "https://git.example.internal/protein-pipeline.git", "a" * 40


def test_the_shipped_definition_gives_each_dispatched_deployment_its_entrypoint_and_pool() -> None:
    definition = load_definition()
    score = expected_deployment(definition, "score/gpu", REPO, SHA)
    train = expected_deployment(definition, "train/gpu", REPO, SHA)
    assert (score.entrypoint, score.work_pool) == ("flows/score.py:score", "gpu")
    assert (train.entrypoint, train.work_pool) == ("flows/train.py:train", "gpu")
    assert deployment_problems(score, "flows/score.py:score", score.pull_steps(), "gpu") == []
    with pytest.raises(ValueError, match="deployment score/cpu is not defined"):
        expected_deployment(definition, "score/cpu", REPO, SHA)


def test_every_difference_is_named() -> None:
    expected = expected_deployment(load_definition(), "score/gpu", REPO, SHA)
    other = [{"prefect.deployments.steps.git_clone": {"repository": REPO, "commit_sha": "b" * 40}}]
    problems = deployment_problems(expected, "x.py:x", other, "cpu")
    assert problems == ["entrypoint is 'x.py:x', expected 'flows/score.py:score'",
                        f"pull step is ('{REPO}', '{'b' * 40}'), expected a git clone of {REPO} at {SHA}",
                        "work pool is 'cpu', expected 'gpu'"]
    # A second step (say, a pip install of something else) is a different pull step too.
    extra = [*expected.pull_steps(), {"prefect.deployments.steps.run_shell_script": {"script": "curl x | sh"}}]
    assert deployment_problems(expected, expected.entrypoint, extra, "gpu")[0].startswith("pull step is [")


def test_who_started_a_run() -> None:
    assert started_by(True, None) == "schedule"
    assert started_by(False, "AUTOMATION") == "automation"
    assert started_by(False, None) is None  # through the API: a person, or anyone with the credential
    assert started_by(False, "USER") is None


def test_scheduled_and_triggered_runs_take_the_gate_of_the_definition() -> None:
    definition = {"deployments": [{
        "name": "nightly", "entrypoint": "flows/retrain.py:retrain",
        "parameters": {"gate_config": {"min_score": 0.4}},
        "schedules": [{"cron": "0 2 * * *", "parameters": {"gate_config": {"min_gain": 0.01}}}],
        "triggers": [{"parameters": {"data": "x"}}]}]}
    assert definition_gate(definition, "retrain/nightly", "schedule") == {"min_score": 0.4, "min_gain": 0.01}
    assert definition_gate(definition, "retrain/nightly", "automation") == {"min_score": 0.4}
    assert definition_gate(load_definition(), "retrain/nightly", "schedule") == {}  # GateParams' defaults


TOKEN_REFERENCE = "{{ prefect.blocks.secret.protein-deploy-token }}"


def with_clone_token(token: str) -> dict[str, Any]:
    """The shipped definition with the runbook's private-repository recipe applied."""
    definition = load_definition()
    definition["pull"] = [{GIT_CLONE: {**definition["pull"][0][GIT_CLONE], "access_token": token}}]
    return definition


def test_a_private_repositorys_token_reference_passes_the_pull_step_check() -> None:
    expected = expected_deployment(with_clone_token(TOKEN_REFERENCE), "score/gpu", REPO, SHA)
    held = [{GIT_CLONE: {"repository": REPO, "commit_sha": SHA, "access_token": TOKEN_REFERENCE}}]
    assert git_clone_source(held) == (REPO, SHA)
    assert deployment_problems(expected, "flows/score.py:score", held, "gpu") == []
    # The token dropped (or added) through the API is a different pull step, named as such.
    bare = [{GIT_CLONE: {"repository": REPO, "commit_sha": SHA}}]
    assert deployment_problems(expected, "flows/score.py:score", bare, "gpu") == [
        f"pull step's access_token is None, expected {TOKEN_REFERENCE!r}"]


def test_a_literal_clone_token_is_refused_and_never_repeated() -> None:
    with pytest.raises(ValueError, match="access_token must be a Secret block reference"):
        expected_deployment(with_clone_token("ghp_LITERALTOKEN"), "score/gpu", REPO, SHA)
    held = [{GIT_CLONE: {"repository": REPO, "commit_sha": SHA, "access_token": "ghp_LITERALTOKEN"}}]
    assert git_clone_source(held) is None
    expected = expected_deployment(load_definition(), "score/gpu", REPO, SHA)
    [problem] = deployment_problems(expected, "flows/score.py:score", held, "gpu")
    assert problem.startswith("pull step is [") and "LITERALTOKEN" not in problem, problem


class FakeClient:
    """get_client(sync_client=True) as the deployment check uses it: every deployment holds `pull_steps`."""

    def __init__(self, pull_steps: list[dict[str, Any]]) -> None:
        self.held = SimpleNamespace(entrypoint="flows/score.py:score", pull_steps=pull_steps, work_pool_name="gpu")

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read_deployment(self, deployment_id: str) -> SimpleNamespace:
        return self.held

    def read_deployment_by_name(self, name: str) -> SimpleNamespace:
        return self.held


def test_the_retrain_runs_from_a_deployment_whose_clone_carries_the_token_reference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The retrain's own deployment and the one it dispatches to both hold the runbook's
    access_token: its own source is found and the dispatched deployment is as defined."""
    import logging

    import tasks.deployment_check as deployment_check

    held = [{GIT_CLONE: {"repository": REPO, "commit_sha": SHA, "access_token": TOKEN_REFERENCE}}]
    monkeypatch.setattr(deployment_check, "this_deployment", SimpleNamespace(id="own-id", name="nightly"))
    monkeypatch.setattr(deployment_check, "get_client", lambda sync_client: FakeClient(held))
    monkeypatch.setattr(deployment_check, "load_definition", lambda: with_clone_token(TOKEN_REFERENCE))
    monkeypatch.setattr(deployment_check, "get_run_logger", lambda: logging.getLogger("test"))
    assert deployment_check.own_source() == (REPO, SHA)
    assert deployment_check.check_deployment.fn("score/gpu") == {"deployment": "score/gpu", "commit": SHA}
