"""Events, the dataset-push deployment trigger, skip_if_unchanged and the automations, through a
real Prefect server, worker and webhook receiver (tests/integration/prefect_stack.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tests.helpers import REPO
from tests.integration.dead_run import HEARD_WITHIN_S, DeadRun
from tests.integration.prefect_stack import TEST_ZOMBIE_AFTER_S, Stack

pytestmark = pytest.mark.integration

PRESIGN_MARKERS = ("X-Amz-Signature", "X-Amz-Credential", "Signature=", "AWSAccessKeyId")


def push_event(stack: Stack, payload: dict[str, Any]) -> None:
    """Emit protein.dataset.pushed from a fresh process through the CLI's indirection, as
    `protein datasets push` does after uploading."""
    code = textwrap.dedent(f"""
        import sys
        from tasks.events import DATASET_PUSHED, _emit_now, _resource
        payload = {payload!r}
        ok = _emit_now(DATASET_PUSHED, _resource("dataset", payload.get("fingerprint", "none"), "test"), payload)
        sys.exit(0 if ok else 1)
    """)
    result = stack.python(code)
    assert result.returncode == 0, f"event not sent: {result.stdout}{result.stderr}"


def champion_now(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The stack store's champion as the stack's own processes see it (their S3 endpoint and keys)."""
    from protein.registry import Registry
    from protein.storage import open_store

    with monkeypatch.context() as patch:
        for name, value in stack.env.items():
            if name.startswith("AWS_"):
                patch.setenv(name, value)
        return Registry(open_store(stack.store)).champion().champion


def test_dataset_push_triggers_retrain_that_reports_by_events_artifacts_and_webhook(
    prefect_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = prefect_stack
    # The stack is shared with the UI test, which may have promoted a model already (in whatever
    # order the two run): this test asserts a first promotion, so it starts without a champion.
    stack.without_champion()
    assert champion_now(stack, monkeypatch) is None
    # The user's command: upload the dataset to the store; it emits protein.dataset.pushed.
    pushed = subprocess.run([sys.executable, "-m", "protein.cli", "datasets", "push", "--data", str(stack.dataset),
                             "--store", stack.store], env=stack.env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert pushed.returncode == 0, f"datasets push failed: {pushed.stdout}{pushed.stderr}"
    uri, event_id = json.loads(pushed.stdout)["uri"], json.loads(pushed.stdout)["event_id"]
    assert uri.startswith(f"{stack.store}/datasets/")

    # The trigger names the channel; the run resolves it to this push's immutable URI.
    run = stack.wait_run("retrain/nightly", lambda r: r.parameters.get("data") == "channel:latest"
                         and r.parameters.get("trigger_event") == f"protein.dataset.pushed {event_id}",
                         "started by protein.dataset.pushed")
    # On: a push trains unless the champion was trained on exactly this data (none here yet).
    assert run.parameters["skip_if_unchanged"] is True, run.parameters
    run = stack.wait_final(run.id)
    assert run.state.is_completed(), f"retrain ended {run.state.name}: {run.state.message}\n{stack.logs()}"

    # Artifacts of THIS run, by flow run id.
    artifacts = stack.artifacts(run.id)
    assert {"gate-decision", "per-class-comparison", "training-progress", "training-history", "retrain-summary",
            "submission", "validation-summary"} <= set(artifacts), sorted(artifacts)
    assert artifacts["training-progress"].data == 100.0
    history = json.loads(artifacts["training-history"].data)
    assert [row["epoch"] for row in history] == [1]
    assert {"train_loss", "holdout_f1_samples", "images_per_s"} <= set(history[0])
    assert "# Gate: PROMOTE" in artifacts["gate-decision"].data, artifacts["gate-decision"].data
    summary = artifacts["retrain-summary"].data
    assert f"- data: `{uri}`" in summary and "champion before: `none`" in summary
    assert f"{stack.store}/submissions/" in summary, summary
    for key, artifact in artifacts.items():  # durable URIs only; nothing that expires or grants access
        text = json.dumps(artifact.data) + str(artifact.description)
        assert not any(marker in text for marker in PRESIGN_MARKERS), f"{key} holds a presigned URL: {text[:300]}"
    assert f"]({stack.store}/submissions/" in artifacts["submission"].data, artifacts["submission"].data

    # The vocabulary, emitted from the tasks of this run.
    vocabulary = {"protein.validation.passed", "protein.model.registered", "protein.model.promoted",
                  "protein.submission.written"}
    emitted = stack.wait_events("protein.", f"prefect.flow-run.{run.id}", vocabulary)
    assert vocabulary <= set(emitted), sorted(emitted)
    assert emitted["protein.submission.written"]["payload"]["uri"].startswith(f"{stack.store}/submissions/")
    promoted = emitted["protein.model.promoted"]["payload"]
    champion = promoted["version"]
    assert promoted["champion_before"] is None and promoted["champion"] == champion
    assert promoted["reasons"] and promoted["challenger_score"] is not None

    # The promotion automation posted to the webhook.
    message = stack.receiver.wait_for(lambda m: f"model {champion} promoted" in m.get("text", ""),
                                      f"about {champion}'s promotion", describe=stack.logs)
    assert message["subject"] == f"protein: model {champion} promoted"

    # Clean logs (issue 12 item 8): nothing in this run's log is a traceback.
    logs = stack.run_logs(run.id)
    assert logs, "the run wrote logs"
    tracebacks = [m for m in logs if "Traceback (most recent call last)" in m or "TerminationSignal" in m]
    assert not tracebacks, "tracebacks in a completed retrain's log:\n" + "\n---\n".join(tracebacks[:3])

    # The nightly schedule's parameters on the same, unchanged data: completes without training.
    with stack.client() as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
        assert [s.parameters for s in nightly.schedules] == [{"skip_if_unchanged": True}]
        skip = client.create_flow_run_from_deployment(nightly.id, parameters={"skip_if_unchanged": True})
    skip = stack.wait_final(skip.id)
    assert skip.state.is_completed(), f"{skip.state.name}: {skip.state.message}"
    assert skip.state.message.startswith("nothing trained: the data"), skip.state.message
    assert champion in skip.state.message
    skipped = stack.artifacts(skip.id)
    assert "training-progress" not in skipped, "nothing was trained"
    assert "# Retrain: skipped, data unchanged" in skipped["retrain-summary"].data

    # A re-push of the same data: the trigger's run trains nothing either (the same data twice
    # would cost a GPU run and could only promote a twin of the champion).
    again = subprocess.run([sys.executable, "-m", "protein.cli", "datasets", "push", "--data", str(stack.dataset),
                            "--store", stack.store], env=stack.env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, f"datasets push failed: {again.stdout}{again.stderr}"
    repushed = stack.wait_run("retrain/nightly", lambda r: r.parameters.get("trigger_event")
                              == f"protein.dataset.pushed {json.loads(again.stdout)['event_id']}", "for the re-push")
    repushed = stack.wait_final(repushed.id)
    assert repushed.state.is_completed(), f"{repushed.state.name}: {repushed.state.message}"
    assert (repushed.state.message or "").startswith("nothing trained: the data"), repushed.state.message
    assert champion_now(stack, monkeypatch) == champion


def test_event_without_channel_fails_the_run_at_once_and_alerts(prefect_stack: Stack) -> None:
    stack = prefect_stack
    push_event(stack, {"fingerprint": "bad0", "counts": {"train": 3}})  # no "channel"
    run = stack.wait_run("retrain/nightly", lambda r: r.parameters.get("data") == "channel:"
                         and str(r.parameters.get("trigger_event", "")).startswith("protein.dataset.pushed "),
                         "started by the malformed event")
    run = stack.wait_final(run.id)
    assert run.state.is_failed(), run.state
    event_ref = run.parameters["trigger_event"]
    assert run.state.message == f"event {event_ref}: field payload.channel is missing or empty; nothing was run"
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with stack.client() as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert not tasks, f"the run failed before any task, ran {[t.name for t in tasks]}"

    message = stack.receiver.wait_for(lambda m: str(run.id) in m.get("text", ""), f"about failed run {run.id}",
                                      describe=stack.logs)
    assert message["subject"] == f"protein: retrain run {run.name} Failed"
    assert "field payload.channel is missing" in message["text"]


@pytest.mark.last_in_unit  # the dead run's 90 s window passes while the stack's other tests run
def test_run_without_heartbeats_is_crashed_and_alerted(prefect_stack: Stack, dead_run: DeadRun) -> None:
    stack = prefect_stack
    assert dead_run.thread is not None
    dead_run.thread.join(timeout=HEARD_WITHIN_S + 60)
    assert not dead_run.thread.is_alive(), f"the probe flow was neither heard nor killed within {HEARD_WITHIN_S:.0f} s"
    assert dead_run.problem is None and dead_run.flow_run_id is not None, dead_run.problem
    flow_run_id = dead_run.flow_run_id
    # Crashed once the window passes without a beat; the margin is the automation's own evaluation.
    run = stack.wait_final(flow_run_id, timeout_s=TEST_ZOMBIE_AFTER_S + 120)
    assert run.state.type.value == "CRASHED", run.state
    assert "heartbeats stopped" in (run.state.message or "")
    message = stack.receiver.wait_for(lambda m: flow_run_id in m.get("text", ""), "about the crashed run",
                                      describe=stack.logs)
    assert message["subject"].endswith("Crashed"), message

