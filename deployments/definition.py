"""The deployments as git defines them (deployments/prefect.yaml), and what a deployment read back
from the Prefect API must still look like.

Every host holds the same Prefect credential, and the open-source server cannot restrict what it
may do (docs/security.md): a compromised GPU host could point `score/gpu` at another commit or
repository, another entrypoint, or the cpu pool, whose worker holds the orchestrator's keys. The
retrain therefore compares the deployment it is about to dispatch to with the definition in its
own checkout before every dispatch, and takes the gate's settings of a run that no person started
from that definition too. Pure: no Prefect import; the thin task is tasks/deployment_check.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PREFECT_FILE = Path(__file__).resolve().parent / "prefect.yaml"
GIT_CLONE = "prefect.deployments.steps.git_clone"
# A private repository's clone token: only ever a Secret block reference, resolved on the worker
# when the run starts; a literal token would be stored by the server and shown to every reader.
SECRET_BLOCK = re.compile(r"\{\{ *prefect\.blocks\.secret\.[\w-]+ *\}\}")


@dataclass(frozen=True)
class ExpectedDeployment:
    """What `flow/name` must be on the server: the definition's entrypoint and pool, and one
    git_clone pull step of this repository at this commit, with the definition's access_token
    (a Secret block reference) when it has one."""

    name: str
    entrypoint: str
    work_pool: str
    repository: str
    commit: str
    access_token: str | None = None

    def pull_steps(self) -> list[dict[str, Any]]:
        step = {"repository": self.repository, "commit_sha": self.commit}
        if self.access_token is not None:
            step["access_token"] = self.access_token
        return [{GIT_CLONE: step}]


def load_definition(path: Path = PREFECT_FILE) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("deployments"), list):
        raise ValueError(f"{path}: no deployments list")
    return document


def defined_deployment(definition: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The entry of `flow/name` (the flow is the entrypoint's function, as every flow here is named)."""
    flow, _, deployment = name.partition("/")
    for entry in definition["deployments"]:
        if entry.get("name") == deployment and str(entry.get("entrypoint", "")).rpartition(":")[2] == flow:
            return entry
    raise ValueError(f"deployment {name} is not defined in deployments/prefect.yaml")


def expected_deployment(definition: Mapping[str, Any], name: str, repository: str, commit: str) -> ExpectedDeployment:
    """`repository` and `commit`: what the definition's {{ $PROTEIN_REPOSITORY }} and
    {{ $PROTEIN_COMMIT }} were at deploy time, i.e. the pull step of the retrain's own deployment."""
    entry = defined_deployment(definition, name)
    pull = definition.get("pull") or []
    if [list(step) for step in pull] != [[GIT_CLONE]]:
        raise ValueError(f"deployments/prefect.yaml: expected one {GIT_CLONE} pull step, found {pull}")
    access_token = (pull[0][GIT_CLONE] or {}).get("access_token")
    if access_token is not None and not SECRET_BLOCK.fullmatch(str(access_token)):
        raise ValueError(f"deployments/prefect.yaml: the {GIT_CLONE} step's access_token must be a Secret block "
                         "reference ({{ prefect.blocks.secret.<name> }}), never a literal token")
    return ExpectedDeployment(name, entry["entrypoint"], entry["work_pool"]["name"], repository, commit,
                              None if access_token is None else str(access_token))


def git_clone_source(pull_steps: list[dict[str, Any]] | None) -> tuple[str, str] | None:
    """(repository, commit) of a deployment's single git_clone pull step, which may also carry an
    access_token that is a Secret block reference; None for anything else."""
    if not pull_steps or len(pull_steps) != 1 or list(pull_steps[0]) != [GIT_CLONE]:
        return None
    step = pull_steps[0][GIT_CLONE] or {}
    if set(step) - {"access_token"} != {"repository", "commit_sha"}:
        return None
    if "access_token" in step and not SECRET_BLOCK.fullmatch(str(step["access_token"])):
        return None
    return str(step["repository"]), str(step["commit_sha"])


def _without_literal_tokens(value: Any) -> Any:
    """`value` with any access_token that is not a Secret block reference shown as '***': the
    refusal is logged and kept in the run's state."""
    if isinstance(value, Mapping):
        return {key: "***" if key == "access_token" and not SECRET_BLOCK.fullmatch(str(item))
                else _without_literal_tokens(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_literal_tokens(item) for item in value]
    return value


def deployment_problems(expected: ExpectedDeployment, entrypoint: str | None, pull_steps: list[dict[str, Any]] | None,
                        work_pool: str | None) -> list[str]:
    """What differs between the deployment the server holds and its definition; empty when none."""
    problems = []
    if entrypoint != expected.entrypoint:
        problems.append(f"entrypoint is {entrypoint!r}, expected {expected.entrypoint!r}")
    if pull_steps != expected.pull_steps():
        source = git_clone_source(pull_steps)
        if source == (expected.repository, expected.commit):
            token = (pull_steps or [{}])[0][GIT_CLONE].get("access_token")
            problems.append(f"pull step's access_token is {token!r}, expected {expected.access_token!r}")
        else:
            problems.append(f"pull step is {source or _without_literal_tokens(pull_steps)!r}, expected a git clone "
                            f"of {expected.repository} at {expected.commit}")
    if work_pool != expected.work_pool:
        problems.append(f"work pool is {work_pool!r}, expected {expected.work_pool!r}")
    return problems


def definition_gate(definition: Mapping[str, Any], name: str, started_by: str) -> dict[str, Any]:
    """The gate settings the definition gives a run of `name` started by the scheduler ("schedule")
    or a deployment trigger ("automation"): the deployment's gate_config, then its schedule's or
    trigger's on top. Values a run was given through the API do not count."""
    entry = defined_deployment(definition, name)
    values = dict((entry.get("parameters") or {}).get("gate_config") or {})
    group = {"schedule": "schedules", "automation": "triggers"}[started_by]
    overrides = [dict((item.get("parameters") or {}).get("gate_config") or {}) for item in entry.get(group) or []]
    if len({tuple(sorted(o.items())) for o in overrides}) > 1:
        raise ValueError(f"deployment {name}: its {group} give different gate settings; one {started_by} run "
                         "cannot tell which is its own")
    return {**values, **(overrides[0] if overrides else {})}


def started_by(auto_scheduled: bool, creator_type: str | None) -> str | None:
    """Who created a flow run, as the server records it: the scheduler sets auto_scheduled, an
    automation (a deployment trigger) sets created_by.type AUTOMATION; None means through the API
    with no such mark, i.e. a person (or anyone holding the one API credential)."""
    if auto_scheduled:
        return "schedule"
    if creator_type == "AUTOMATION":
        return "automation"
    return None
