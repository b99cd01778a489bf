"""`python -m deployments.deploy --check` against a real (temporary) Prefect API, a real git
repository and a real local store: every check runs, the plan is printed, nothing is created."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deployments import deploy
from protein.cli import main as protein_main
from tests.helpers import REPO, write_dataset

pytestmark = [pytest.mark.integration]


def test_check_prints_the_plan_and_changes_nothing(prefect_harness: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.client.orchestration import get_client

    store = tmp_path / "store"
    data = write_dataset(tmp_path / "ds", {str(i): "0" for i in range(4)}, ["9"], size=8)
    assert protein_main(["datasets", "push", "--data", str(data), "--store", str(store)]) == 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()
    # Deployed from a clone of HEAD, as an operator deploys: this checkout may hold work not yet
    # committed, which deploy refuses to register.
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True, capture_output=True)
    monkeypatch.setattr(deploy, "REPO", checkout)
    for name, value in {"PROTEIN_REPOSITORY": str(REPO), "PROTEIN_COMMIT": head, "PROTEIN_STORE": str(store),
                        "PROTEIN_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"}.items():
        monkeypatch.setenv(name, value)
    # The server is shared by the session's tests (in random order): others may have created pools
    # and deployments already. What --check must not change is what there was before it.
    def server_state() -> tuple[list[str], list[str]]:
        with get_client(sync_client=True) as client:
            return (sorted(p.name for p in client.read_work_pools()),
                    sorted(str(d.id) for d in client.read_deployments()))

    pools_before, deployments_before = server_state()
    missing = [pool for pool in ("cpu", "gpu") if pool not in pools_before]
    capsys.readouterr()
    assert deploy.main(["--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok: repository {REPO} has commit {head[:12]}"
    assert f"ok: retrain/nightly: data channel:latest is push #1 ({store}/datasets/" in "\n".join(out)
    assert f"would deploy {REPO}@{head} with store {store}" in out
    nightly = next(line for line in out if line.startswith("  retrain/nightly:"))
    assert "'data': 'channel:latest'" in nightly and "concurrency 1 (ENQUEUE)" in nightly
    assert "triggered by protein.dataset.pushed" in nightly and "schedule 0 2 * * * Europe/Berlin" in nightly
    to_create = f" ({', '.join(missing)} to be created)" if missing else ""
    assert f"  work pools: cpu, gpu{to_create}; gpu concurrency 1" in out, out
    assert server_state() == (pools_before, deployments_before), "--check created nothing"


def test_applying_the_automations_removes_the_projects_that_the_file_no_longer_has(
        prefect_harness: None, tmp_path: Path) -> None:
    """A renamed or removed automation left on the server would go on firing for ever (a renamed
    failure alert: every failure alerted twice). apply deletes the project's (protein-) ones the
    file no longer has, and nothing else on the server."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    from deployments import automations

    def automation_file(names: list[str]) -> Path:
        path = tmp_path / f"{'-'.join(names)}.yaml"
        text = "automations:\n" + "".join(
            f"""  - name: {name}
    trigger: {{type: event, posture: Reactive, match: {{prefect.resource.id: "protein.test.{name}"}},
              expect: [protein.test.never], threshold: 1, within: 0}}
    actions: [{{type: send-notification, block: {automations.BLOCK_NAME}, subject: s, body: b}}]
""" for name in names)
        path.write_text(text)
        return path

    def automation_ids() -> dict[str, str]:
        with get_client(sync_client=True) as client:
            return {a.name: str(a.id) for a in client.read_automations() if a.name.startswith("protein-test-")}

    def project_automations() -> set[str]:
        with get_client(sync_client=True) as client:
            return {a.name for a in client.read_automations() if a.name.startswith("protein-test-")}

    with get_client(sync_client=True) as client:
        teams_own = client.create_automation(AutomationCore(
            name="team-own-alert", trigger=EventTrigger(expect={"team.never"}, threshold=1, within=0),
            actions=[{"type": "do-nothing"}]))
    try:
        automations.apply(automation_file(["protein-test-a", "protein-test-b"]), "http://127.0.0.1:9/hook")
        assert project_automations() == {"protein-test-a", "protein-test-b"}
        kept = automation_ids()["protein-test-a"]
        automations.apply(automation_file(["protein-test-a", "protein-test-c"]), "http://127.0.0.1:9/hook")
        assert project_automations() == {"protein-test-a", "protein-test-c"}  # b renamed to c: b is gone
        # a is unchanged: kept, with its trigger's state (replaced, a missing-nightly window restarted).
        assert automation_ids()["protein-test-a"] == kept
        # A second automation of one name (two deploys at once) is removed by the next apply.
        with get_client(sync_client=True) as client:
            [a] = client.read_automations_by_name("protein-test-a")
            client.create_automation(AutomationCore.model_validate(a.model_dump(include=set(AutomationCore.model_fields))))
        automations.apply(automation_file(["protein-test-a", "protein-test-c"]), "http://127.0.0.1:9/hook")
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name("protein-test-a")) == 1
        # Stale ones past the server's first page of answers are found too (pages of 2 here, of
        # the server's 200 in production): all but the first two of five would survive one page.
        five = [f"protein-test-{c}" for c in "defgh"]
        automations.apply(automation_file(["protein-test-a", *five]), "http://127.0.0.1:9/hook")
        automations.apply(automation_file(["protein-test-a"]), "http://127.0.0.1:9/hook", page=2)
        assert project_automations() == {"protein-test-a"}
        with get_client(sync_client=True) as client:
            assert client.read_automation(teams_own) is not None  # not the project's: untouched
    finally:
        with get_client(sync_client=True) as client:
            for automation in client.read_automations():
                if automation.name.startswith("protein-test-") or automation.id == teams_own:
                    client.delete_automation(automation.id)
