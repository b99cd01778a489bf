"""Before the retrain dispatches to a deployment: is it still the one git defines?

Kept apart from tasks/dispatch.py (which only waits and retries): reading a deployment back and
comparing it with deployments/prefect.yaml is a different question, asked before every dispatch.
The pure comparison is deployments/definition.py.
"""

from __future__ import annotations

import subprocess
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run as this_flow_run
from prefect.states import State

from deployments.definition import (
    PREFECT_FILE,
    definition_gate,
    deployment_problems,
    expected_deployment,
    git_clone_source,
    load_definition,
    started_by,
)


class DeploymentChanged(RuntimeError):
    """The deployment on the server is not what deployments/prefect.yaml defines; nothing was
    dispatched to it. A RuntimeError, as a failed dispatch is: the retrain fails with the line."""


def _not_changed(task: Any, task_run: Any, state: State) -> bool:
    # A changed deployment stays changed: retry only a failed read of the server.
    return not isinstance(state.result(raise_on_failure=False), DeploymentChanged)


def own_source() -> tuple[str, str]:
    """(repository, commit) of the code this retrain runs: its own deployment's git_clone step
    when it runs from one, else this checkout's origin and HEAD."""
    own_id = this_deployment.id
    if own_id:
        with get_client(sync_client=True) as client:
            source = git_clone_source(client.read_deployment(own_id).pull_steps)
        if source is None:
            raise DeploymentChanged(f"this run's own deployment {this_deployment.name} has no single git clone "
                                    f"pull step as {PREFECT_FILE.name} defines; nothing was dispatched")
        return source
    checkout = PREFECT_FILE.parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, check=True, capture_output=True,
                                text=True, timeout=30).stdout.strip()
        origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=checkout, check=True,
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        raise DeploymentChanged(f"{checkout}: not a git clone with an origin, so the commit a deployment must run "
                                "is unknown; run the retrain from its deployment or a clone") from None
    return origin, commit


@task(name="check-deployment", task_run_name="check-{name}", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_not_changed, cache_policy=NO_CACHE)
def check_deployment(name: str) -> dict[str, Any]:
    """Refuse (DeploymentChanged, one line) unless `name` on the server has the entrypoint, the
    pull step (this code's repository and commit) and the work pool that deployments/prefect.yaml
    defines for it."""
    repository, commit = own_source()
    try:
        expected = expected_deployment(load_definition(), name, repository, commit)
    except ValueError as exc:  # not a deployment git defines: nothing to compare it with
        raise DeploymentChanged(f"{exc}; nothing was dispatched to it") from None
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            actual = client.read_deployment_by_name(name)
        except ObjectNotFound:  # stays missing until someone deploys it: refused at once, not retried
            defined_in = f"{PREFECT_FILE.parent.name}/{PREFECT_FILE.name}"
            raise DeploymentChanged(f"deployment {name} does not exist on the server; deploy it ({defined_in}); "
                                    "nothing was dispatched") from None
    problems = deployment_problems(expected, actual.entrypoint, actual.pull_steps, actual.work_pool_name)
    if problems:
        raise DeploymentChanged(f"deployment {name} is not what {PREFECT_FILE.name} defines: {'; '.join(problems)}; "
                                "nothing was dispatched to it")
    get_run_logger().info("deployment %s is as defined (%s at %s, pool %s)", name, repository, commit[:12],
                          expected.work_pool)
    return {"deployment": name, "commit": commit}


def definition_gate_of_this_run() -> tuple[str, dict[str, Any]] | None:
    """(who started it, the definition's gate settings) for a deployment run that the scheduler or
    an automation created; None for a run a person started (or one outside any deployment)."""
    if not this_deployment.id:
        return None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(this_flow_run.id)
    origin = started_by(run.auto_scheduled, run.created_by.type if run.created_by else None)
    if origin is None:
        return None
    return origin, definition_gate(load_definition(), f"{this_flow_run.flow_name}/{this_deployment.name}", origin)
