"""deployments/definition.py: what a deployment must look like, and whose gate settings a run uses."""

from __future__ import annotations

import pytest

from deployments.definition import (
    definition_gate,
    deployment_problems,
    expected_deployment,
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
