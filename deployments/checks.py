"""What `python -m deployments.deploy` checks before (and after) registering deployments, so that
what would fail at 02:00 fails at deploy time, naming the setting.

Each check raises SettingError with one line, or returns a line saying what it found."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 60
PLACEHOLDER = "{{ $"


class SettingError(Exception):
    """A deploy-time setting is missing or unusable; the message names it."""


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)


def check_repository(repository: str, commit: str, checkout: Path) -> str:
    """The repository answers `git ls-remote` and the commit is on one of its branches or tags
    (a ref's tip, or an ancestor of a tip this checkout has): what every worker's clone needs."""
    try:
        listed = git("ls-remote", repository, cwd=checkout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SettingError(f"PROTEIN_REPOSITORY={repository}: git ls-remote failed: {exc}") from None
    if listed.returncode != 0:
        lines = listed.stderr.strip().splitlines()
        raise SettingError(f"PROTEIN_REPOSITORY={repository}: git ls-remote failed: "
                           f"{lines[-1] if lines else listed.returncode}")
    tips = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    if commit in tips:
        return f"repository {repository} has commit {commit[:12]}"
    for tip in tips:
        known = git("cat-file", "-e", f"{tip}^{{commit}}", cwd=checkout).returncode == 0
        if known and git("merge-base", "--is-ancestor", commit, tip, cwd=checkout).returncode == 0:
            return f"repository {repository} has commit {commit[:12]} (behind {tip[:12]})"
    raise SettingError(f"PROTEIN_COMMIT={commit[:12]} is on no branch or tag of {repository}: workers could not "
                       "clone it (git push it first)")


def check_store(store: str) -> str:
    """The store answers, and (S3) honours conditional writes: the champion pointer and dataset
    channels rely on compare-and-swap."""
    from protein.errors import ProteinError
    from protein.storage import open_store

    try:
        opened = open_store(store)
        opened.check()
    except (ProteinError, ValueError, OSError) as exc:
        raise SettingError(f"PROTEIN_STORE={store}: {exc}") from None
    if getattr(opened, "conditional_writes_verified", True) is False:
        # The operator's keys may not write probes/ (only the trainer's may): said, not claimed.
        return (f"store {store} answers; conditional writes NOT verified (these credentials may not write the "
                "probe, or PROTEIN_ALLOW_LAST_WRITER_WINS is set): the trainer's first run checks them")
    return f"store {store} answers and supports conditional writes"


def check_data(data: str, store: str, deployment: str) -> str:
    """A deployment's `data` resolves (a channel with a push) to a dataset that opens."""
    from protein.data import open_dataset
    from protein.data.channels import resolve_data
    from protein.errors import ProteinError

    try:
        resolved = resolve_data(data, store)
        open_dataset(resolved.uri)
    except (ProteinError, ValueError, OSError) as exc:
        raise SettingError(f"{deployment}: data {data}: {exc}") from None
    if resolved.channel:
        return f"{deployment}: data {data} is push #{resolved.sequence} ({resolved.uri})"
    return f"{deployment}: data {data} opens"


def placeholders(value: Any, path: str = "") -> Iterator[str]:
    """Every string under ``value`` that still holds a literal ``{{ $VAR }}``, as 'path: text'.
    Pure: run over what the server holds for a deployment."""
    if isinstance(value, str):
        if PLACEHOLDER in value:
            yield f"{path}: {value}"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from placeholders(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from placeholders(item, f"{path}[{i}]")


def deployment_names(prefect_file: Path) -> list[str]:
    """'flow/deployment' for every deployment in prefect.yaml (each entrypoint's function is its flow)."""
    import yaml

    docs = yaml.safe_load(prefect_file.read_text())["deployments"]
    return [f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}" for d in docs]


def check_registered(prefect_file: Path) -> list[str]:
    """The deployments as the server holds them: each exists and holds no literal {{ $VAR }} (what
    a plain `prefect deploy` registers when a variable is unset). Needs PREFECT_API_URL."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found: list[str] = []
    with get_client(sync_client=True) as client:
        for name in deployment_names(prefect_file):
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise SettingError(f"deployment {name} is not registered on {client.api_url}") from None
            fields = {"parameters": deployment.parameters, "job_variables": deployment.job_variables,
                      "pull_steps": deployment.pull_steps}
            if literal := next(placeholders(fields), None):
                raise SettingError(f"deployment {name} holds a literal placeholder ({literal}): its variable was "
                                   "unset when it was deployed; deploy with `python -m deployments.deploy`")
            found.append(name)
        if left := leftover_deployments(client, set(found)):
            # Renamed or removed from the file: it keeps its schedule and trigger, pinned to an old
            # commit, and every run of it fails its deployment check (a failure alert each night).
            raise SettingError(f"deployment {left[0]} (tagged {PROJECT_TAG}) is not in {prefect_file}"
                               f"{f' (nor {len(left) - 1} more)' if len(left) > 1 else ''}: it keeps its schedule "
                               f"and trigger at an old commit; delete it with `prefect deployment delete {left[0]}`")
    return found


# Every deployment of prefect.yaml carries it (a test checks), and the run automations match it: a
# name of this project's own, not "protein", which another team on a shared server may well use.
PROJECT_TAG = "protein-pipeline"


def leftover_deployments(client: Any, defined: set[str]) -> list[str]:
    """'flow/deployment' of the server's deployments tagged as this project's that the file does not
    define, sorted."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    tagged = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[PROJECT_TAG])))
    flows = {flow_id: client.read_flow(flow_id).name for flow_id in {d.flow_id for d in tagged}}
    return sorted(name for d in tagged if (name := f"{flows[d.flow_id]}/{d.name}") not in defined)
