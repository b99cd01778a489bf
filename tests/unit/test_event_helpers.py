"""Pure parts of the events work: the no-op without an API, trigger URI checks, the run summary,
durable links vs presigned URLs, and the automations file."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from deployments.automations import AUTOMATIONS_FILE, BLOCK_NAME, ZOMBIE_AUTOMATION, load_automations
from protein.links import MAX_LINK_S, object_uri, shareable_url
from protein.storage import open_store
from tasks import events
from tasks.summary import dataset_uri_problem, run_summary_markdown
from tests.helpers import run_in_threads


def test_events_do_nothing_without_a_prefect_api() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert not events.api_configured()
        assert events.dataset_pushed("s3://b/data.zip", "abc", {"train": 1}, "latest", 1, str(uuid.uuid4())) is False
        assert events.submission_written("s3://b/s.csv", "m1", 3) is False


@pytest.mark.parametrize(("data", "problem"), [
    ("", "missing or empty"),
    ("   ", "missing or empty"),
    (None, "missing or empty"),
    ("s3://bucket", "'s3://bucket' is not s3://bucket/key"),
    ("s3://bucket/", "'s3://bucket/' is not s3://bucket/key"),
    ("relative/data", "'relative/data' is not an s3:// URI, file:// URI or absolute path"),
    ("http://x/data.zip", "'http://x/data.zip' is not an s3:// URI, file:// URI or absolute path"),
    ("s3://bucket/datasets/x.zip", None),
    ("file:///data/x.zip", None),
    ("/data/protein", None),
    ("channel:latest", None),
    ("channel:", "missing or empty"),
    ("channel:No Such", "invalid dataset channel name 'No Such' (expected lowercase letters, digits, '.', '_' or '-', "
                        "at most 64, starting with a letter or digit)"),
])
def test_dataset_uri_problem(data: object, problem: str | None) -> None:
    assert dataset_uri_problem(data) == problem


def test_run_summary_lists_data_champions_gate_and_links() -> None:
    text = run_summary_markdown({
        "outcome": "promoted", "data": "s3://b/d.zip", "data_fingerprint": "f" * 64, "champion_before": "m1",
        "champion_after": "m2", "challenger": "m2",
        "gate": {"promote": True, "metric": "f1_samples", "challenger_score": 0.5, "champion_score": 0.25,
                 "reasons": ["gain 0.25 clears 0.01"]},
        "links": {"submission": "s3://b/submissions/m2/s.csv", "validation report": None}})
    assert text.splitlines()[0] == "# Retrain: promoted"
    for line in ("- data: `s3://b/d.zip`", "- champion before: `m1`", "- champion after: `m2`",
                 "- gate: **promoted** (f1_samples: challenger 0.5000, champion 0.2500)", "- gain 0.25 clears 0.01",
                 "- submission: `s3://b/submissions/m2/s.csv`"):
        assert line in text.splitlines(), line
    assert "validation report" not in text, "a missing link is left out"


@pytest.mark.parametrize(("champion_before", "gate", "line"), [
    (None, {"promote": False, "metric": "f1_samples", "challenger_score": 0.1, "reasons": ["below 0.2"]},
     "- gate: **refused, no champion yet** (f1_samples: challenger 0.1000)"),
    ("m1", {"promote": False, "metric": "f1_samples", "challenger_score": 0.1, "champion_score": 0.2,
            "reasons": ["worse"]}, "- gate: **kept champion** (f1_samples: challenger 0.1000, champion 0.2000)"),
    # A rerun whose earlier attempt's promotion is the champion, with no gate record: nothing scored.
    ("m2", {"promote": False, "challenger_score": None, "champion_score": None, "reasons": ["already"]},
     "- gate: **kept champion** (f1_samples: not scored)"),
])
def test_run_summary_says_what_the_gate_did(champion_before: str | None, gate: dict[str, object], line: str) -> None:
    text = run_summary_markdown({"outcome": "x", "data": "d", "champion_before": champion_before, "gate": gate})
    assert line in text.splitlines(), text


def test_object_uri_is_durable(tmp_path: Path) -> None:
    assert object_uri(open_store("s3://bucket/prod"), "models/m1/model.json") == "s3://bucket/prod/models/m1/model.json"
    assert object_uri(open_store(str(tmp_path)), "a/b.csv") == (tmp_path / "a" / "b.csv").as_uri()
    with pytest.raises(ValueError, match=r"^invalid object key '\.\./escape'"):
        object_uri(open_store("s3://bucket"), "../escape")


def test_shareable_url_presigns_s3_for_at_most_seven_days(s3_env: object, tmp_path: Path) -> None:
    url = shareable_url("s3://bucket/prod/submission.csv", expires_s=MAX_LINK_S)
    query = parse_qs(urlsplit(url).query)
    assert urlsplit(url).path.endswith("/prod/submission.csv")
    assert query["X-Amz-Expires"] == [str(MAX_LINK_S)] and "X-Amz-Signature" in query
    with pytest.raises(ValueError, match="7 days"):
        shareable_url("s3://bucket/prod/submission.csv", expires_s=MAX_LINK_S + 1)
    with pytest.raises(ValueError, match="s3://bucket/key"):
        shareable_url("s3://bucket")
    assert shareable_url(str(tmp_path / "x.csv")) == (tmp_path / "x.csv").as_uri()


def test_automations_file_names_the_webhook_block_and_the_zombie_window() -> None:
    block_id = str(uuid.uuid4())
    automations = {a.name: a for a in load_automations(AUTOMATIONS_FILE, {BLOCK_NAME: block_id})}
    assert set(automations) == {"protein-run-failed", "protein-push-retrain-cancelled", ZOMBIE_AUTOMATION,
                                "protein-nightly-missing", "protein-model-promoted"}
    notify = [a for a in automations.values() for action in a.actions if action.type == "send-notification"]
    assert {str(action.block_document_id) for a in notify for action in a.actions} == {block_id}
    failed = automations["protein-run-failed"].trigger
    assert failed.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    # Cancelled alerts only for retrains a push started (their creator is the trigger's automation):
    # train/score runs cancelled on a dispatch timeout are dispatched again, not alerted.
    cancelled = automations["protein-push-retrain-cancelled"].trigger
    assert cancelled.expect == {"prefect.flow-run.Cancelled"}
    assert [dict(spec.root) for spec in cancelled.match_related] == [  # type: ignore[union-attr]
        {"prefect.resource.role": "flow", "prefect.resource.name": "retrain"},
        {"prefect.resource.role": "creator", "prefect.resource.id": "prefect.automation.*"},
        {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.protein-pipeline"}]
    zombie = automations[ZOMBIE_AUTOMATION]
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.within.total_seconds() == 120
    assert zombie.actions[0].type == "change-flow-run-state" and zombie.actions[0].state.value == "CRASHED"
    shorter = {a.name: a for a in load_automations(AUTOMATIONS_FILE, {BLOCK_NAME: block_id}, zombie_after_s=45)}
    assert shorter[ZOMBIE_AUTOMATION].trigger.within.total_seconds() == 45


def test_the_failed_run_alert_covers_every_deployed_flow() -> None:
    import importlib

    import yaml

    deployed = yaml.safe_load((AUTOMATIONS_FILE.parent / "prefect.yaml").read_text())["deployments"]
    flow_names = set()
    for deployment in deployed:
        path, function = deployment["entrypoint"].split(":")
        flow_names.add(getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function).name)
    failed = {a.name: a for a in load_automations(AUTOMATIONS_FILE, {BLOCK_NAME: str(uuid.uuid4())})}[
        "protein-run-failed"].trigger
    specs = [dict(spec.root) for spec in failed.match_related]  # type: ignore[union-attr]
    [by_flow] = [spec for spec in specs if spec.get("prefect.resource.role") == "flow"]
    alerted = set(by_flow["prefect.resource.name"])
    # A standalone validate run answers whoever started it; bad data in the nightly fails the retrain.
    assert flow_names - {"validate"} <= alerted, f"a failure of {flow_names - alerted} would go unnoticed"


def test_a_nightly_that_never_completes_is_alerted_within_two_days() -> None:
    """Every other alert reacts to something that happened: a nightly stuck Late behind a dead worker,
    or queued behind a hung retrain, sends nothing. The proactive alert expects a Completed run of the
    deployed nightly at least once a window, and a run of another deployment does not count."""
    import datetime as dt

    import yaml
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    automations = {a.name: a for a in load_automations(AUTOMATIONS_FILE, {BLOCK_NAME: str(uuid.uuid4())})}
    missing = automations["protein-nightly-missing"]
    assert missing.trigger.posture == "Proactive" and missing.trigger.threshold == 1
    assert missing.trigger.expect == {"prefect.flow-run.Completed"}
    assert missing.trigger.within <= dt.timedelta(hours=26)  # a day and the longest run's margin
    assert [action.type for action in missing.actions] == ["send-notification"]
    definition = yaml.safe_load((AUTOMATIONS_FILE.parent / "prefect.yaml").read_text())
    assert "nightly" in {d["name"] for d in definition["deployments"]}

    trigger = EventTrigger.model_validate(missing.trigger.model_dump())

    def completed(deployment: str, flow: str = "retrain",
                  tags: tuple[str, ...] = ("protein-pipeline", "protein", "retrain")) -> ReceivedEvent:
        return run_event("prefect.flow-run.Completed", flow, tags, deployment)

    assert trigger.covers(completed("nightly"))
    assert not trigger.covers(completed("push"))
    # Another project's deployment named nightly, on the same server, keeps nobody quiet.
    assert not trigger.covers(completed("nightly", flow="etl", tags=("etl",)))
    assert not trigger.covers(completed("nightly", tags=("protein", "retrain")))


def run_event(event: str, flow: str, tags: tuple[str, ...], deployment: str | None = None) -> Any:
    """A flow-run event as the server receives it: the flow, the deployment and each tag related."""
    import datetime as dt

    from prefect.server.events.schemas.events import ReceivedEvent

    related = [{"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow",
                "prefect.resource.name": flow}]
    if deployment:
        related.append({"prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}",
                        "prefect.resource.role": "deployment", "prefect.resource.name": deployment})
    related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"} for tag in tags]
    return ReceivedEvent(occurred=dt.datetime.now(dt.UTC), event=event, id=uuid.uuid4(),
                         resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}"}, related=related)


@pytest.mark.parametrize(("automation", "event"), [
    ("protein-crash-zombie-runs", "prefect.flow-run.heartbeat"),
    ("protein-run-failed", "prefect.flow-run.Failed"),
    ("protein-push-retrain-cancelled", "prefect.flow-run.Cancelled"),
])
def test_the_run_automations_watch_this_projects_runs_only(automation: str, event: str) -> None:
    """A shared server runs other projects' flows: another project's run named train that beats every
    300 s was crashed healthy by the zombie watch, and its failures paged this project."""
    from prefect.server.events.schemas.automations import EventTrigger

    found = {a.name: a for a in load_automations(AUTOMATIONS_FILE, {BLOCK_NAME: str(uuid.uuid4())})}[automation]
    trigger = EventTrigger.model_validate(found.trigger.model_dump())
    ours = run_event(event, "retrain", ("protein-pipeline", "protein", "retrain"))
    if automation == "protein-push-retrain-cancelled":
        ours.related.append(ours.related[0].model_validate({"prefect.resource.id": f"prefect.automation.{uuid.uuid4()}",
                                                            "prefect.resource.role": "creator"}))
    assert trigger.covers(ours)
    # Another team's run, even one tagged "protein" (a word a biology group may well use).
    theirs = ours.model_copy(update={"related": [r for r in ours.related if r.role != "tag"]
                                     + [ours.related[0].model_validate({"prefect.resource.id": "prefect.tag.protein",
                                                                        "prefect.resource.role": "tag"})]})
    assert not trigger.covers(theirs)


def test_an_automation_not_named_as_the_projects_is_refused(tmp_path: Path) -> None:
    """apply removes the project's automations the file no longer has, found by their name prefix:
    one named otherwise would outlive its removal from the file."""
    path = tmp_path / "automations.yaml"
    path.write_text(AUTOMATIONS_FILE.read_text().replace("name: protein-model-promoted", "name: model-promoted"))
    with pytest.raises(ValueError, match="'model-promoted': the project's automation names start with 'protein-'"):
        load_automations(path, {BLOCK_NAME: str(uuid.uuid4())})


def test_automations_file_with_an_unknown_block_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(AUTOMATIONS_FILE.read_text().replace("block: protein-alerts", "block: nope", 1))
    with pytest.raises(ValueError, match="unknown notification block 'nope'"):
        load_automations(path, {BLOCK_NAME: str(uuid.uuid4())})


def test_link_cli_rejects_a_lifetime_over_seven_days(capsys: pytest.CaptureFixture[str]) -> None:
    from protein.cli import main

    assert main(["link", "s3://bucket/key.csv", "--hours", "169"]) == 2
    assert capsys.readouterr().err.strip() == ("protein link: error: link lifetime must be 1..604800 s (7 days), "
                                               "got 608400")


@pytest.mark.parametrize("window", ["0", "30", "89"])
def test_the_standalone_apply_refuses_a_zombie_window_shorter_than_three_heartbeats(
        window: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The deploy wrapper refused it; `python -m deployments.automations apply` took 0 as Prefect's
    10 s: every healthy run Crashed between two heartbeats, and paged."""
    from deployments import automations

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    monkeypatch.setattr(automations, "apply", lambda *a: pytest.fail("applied"))
    assert automations.main(["apply", "--webhook-url", "https://hooks.example/x", "--zombie-after-s", window]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--zombie-after-s {window} must be >= 90" in err, err


def test_a_malformed_s3_uri_is_named_without_its_credentials() -> None:
    problem = dataset_uri_problem("s3://AKIAEXAMPLE:topsecret@bucket")
    assert problem is not None and "topsecret" not in problem and "AKIAEXAMPLE" not in problem, problem


class OneServersAutomations:
    """The automations endpoints of one server, shared by the clients of two applies at once: both
    read the failure alert's automations before either changes them, and both have created theirs
    before either goes on."""

    def __init__(self, reads_meet: Any) -> None:
        import threading

        self.lock = threading.Lock()
        self.automations: dict[str, Any] = {}
        self.reads_meet = reads_meet

    def __enter__(self) -> OneServersAutomations:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read_automations_by_name(self, name: str) -> list[Any]:
        with self.lock:
            found = [a for a in self.automations.values() if a.name == name]
        if name == "protein-run-failed":
            self.reads_meet.wait(timeout=10)
        return found

    def read_automations(self, sort: Any = None, limit: int = 200, offset: int = 0) -> list[Any]:
        with self.lock:
            found = sorted(self.automations.values(), key=lambda a: (a.name, str(a.id)))
        return found[offset:offset + limit]

    def delete_automation(self, automation_id: Any) -> None:
        with self.lock:
            self.automations.pop(str(automation_id), None)  # a 404 is no error, as in Prefect's client

    def create_automation(self, automation: Any) -> Any:
        from prefect.events.schemas.automations import Automation

        created = Automation.model_validate({**automation.model_dump(), "id": uuid.uuid4()})
        with self.lock:
            self.automations[str(created.id)] = created
        if automation.name == "protein-run-failed":
            self.reads_meet.wait(timeout=10)
        return created.id


def test_two_applies_at_once_leave_each_automation_exactly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each apply deleted what it had not created itself: two at once (CI and an operator) deleted
    each other's, and the server was left with no failure alert and no zombie watch."""
    import threading

    import prefect.client.orchestration

    from deployments import automations

    server = OneServersAutomations(threading.Barrier(2))
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: server)
    block = str(uuid.uuid4())
    monkeypatch.setattr(automations, "save_webhook_block", lambda url: block)
    defined = load_automations(AUTOMATIONS_FILE, {BLOCK_NAME: block})
    # Deployed before, and changed in the file since: both applies replace it.
    from prefect.events.schemas.automations import Automation

    old = Automation.model_validate({**defined[0].model_dump(), "description": "as it was", "id": uuid.uuid4()})
    server.automations[str(old.id)] = old
    assert defined[0].name == "protein-run-failed"
    errors = run_in_threads(lambda: automations.apply(AUTOMATIONS_FILE, "https://hooks.example/x"), 2, 30)
    assert errors == []
    assert sorted(a.name for a in server.automations.values()) == sorted(a.name for a in defined)
