"""Credentials set for a retrain appear in no log record, artifact, report, state message, Prefect
database row, S3 object or file it writes."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.params import TrainParams
from tests.conftest import set_s3_env
from tests.integration.reliability_common import IMAGE, LENIENT, ONE_THREAD, VALIDATION, without_retry_waits

pytestmark = pytest.mark.integration

FAKE_KEY_ID = "AKIAFAKEPROTEIN0001"
FAKE_SECRET = "SECRETfakeProtein0123456789"
FAKE_TOKEN = "TOKENfakeProteinSession0123456789"
# The Prefect API's basic-auth string and the alert webhook's URL (docs/security.md): secrets every
# worker holds in its environment.
FAKE_AUTH = "admin:AUTHfakeProteinPrefect0123456789"
FAKE_WEBHOOK = "https://hooks.example.invalid/services/WEBHOOKfakeProtein0123456789"
SECRETS = {"secret": FAKE_SECRET, "auth string": FAKE_AUTH.split(":", 1)[1], "webhook": "WEBHOOKfakeProtein0123456789"}
# A presigned URL names the access key id (SigV4: X-Amz-Credential=<key id>/<date>/...; SigV2:
# AWSAccessKeyId=) and grants whoever reads it access to the object. None may be persisted anywhere:
# links are durable s3:// URIs, presigned only on demand by `protein link` (docs/security.md).
PRESIGN_MARKERS = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId=")


def leaks(where: str, text: str | bytes, found: dict[str, list[str]]) -> None:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    for kind, value in SECRETS.items():
        if value in text:
            found["secret"].append(f"{kind} in {where}")
    if any(marker in text for marker in PRESIGN_MARKERS):
        found["presigned"].append(where)
    if FAKE_TOKEN in text:
        found["token"].append(where)
    scrubbed = text
    if FAKE_KEY_ID in scrubbed:
        at = scrubbed.index(FAKE_KEY_ID)
        found["key_id"].append(f"{where}: ...{scrubbed[max(0, at - 80):at + 40]}...")


def prefect_records(flow_run_ids: list[Any]) -> Iterator[tuple[str, str]]:
    """Everything the Prefect API keeps about these runs: logs, artifacts, states, parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)),
                                        limit=200, offset=offset):
            offset += len(batch)
            for log in batch:
                yield f"prefect log: {log.message[:60]}", log.message
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
        for artifact in artifacts:
            yield f"artifact {artifact.key}", f"{artifact.data} {artifact.description}"
        runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
        for run in client.read_flow_runs(flow_run_filter=runs):
            yield f"flow run {run.name}", f"{run.parameters} {run.state and run.state.message}"
        for task_run in client.read_task_runs(flow_run_filter=runs):
            yield f"task run {task_run.name}", str(task_run.state and task_run.state.message)


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def handler_format(record: logging.LogRecord) -> str:
    """The message with its exception and stack, as any handler would write it."""
    return logging.Formatter("%(name)s %(message)s").format(record)


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every record any logger emits, protein's at DEBUG. caplog's handler does not survive Prefect's
    logging set-up, which replaces the root logger's handlers unless one of them has a formatter."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, root, ours = Collect(logging.DEBUG), logging.getLogger(), logging.getLogger("protein")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        ours.setLevel(level)


@pytest.fixture
def prefect_auth_string(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Clients hold the Prefect API's auth string: subprocesses in the environment, this process in settings
    (the session's harness server has no auth, so it ignores the header)."""
    import prefect.settings

    monkeypatch.setenv("PREFECT_API_AUTH_STRING", FAKE_AUTH)
    with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_AUTH_STRING: FAKE_AUTH}):
        yield FAKE_AUTH


def test_credentials_appear_in_no_log_artifact_report_message_or_file(
    prefect_harness, s3_server, small_dataset, tmp_path, isolated_cache, single_torch_thread, monkeypatch, log_records,
    prefect_auth_string, protein_process,
):
    import tempfile

    import boto3
    import prefect.settings

    import flows.retrain as retrain_module

    set_s3_env(monkeypatch, s3_server.endpoint, FAKE_KEY_ID, FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)  # temporary credentials, as a role would have
    monkeypatch.setenv("PROTEIN_ALERT_WEBHOOK_URL", FAKE_WEBHOOK)
    assert prefect.settings.PREFECT_API_AUTH_STRING.value() == prefect_auth_string
    work_tmp = tmp_path / "tmp"
    work_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work_tmp))  # validation reports, model downloads
    without_retry_waits(monkeypatch, retrain_module)
    bucket = f"secrets-{uuid.uuid4().hex[:10]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)

    train = TrainParams(epochs=1, image_size=IMAGE, batch_size=8)
    ok = retrain_module.retrain(data=str(small_dataset), store=f"s3://{bucket}/p", train=train,
                                gate_config=LENIENT, validation=VALIDATION, return_state=True)
    assert ok.is_completed(), ok.message
    # A failing run too: error messages are built from URIs and codes, never from credentials.
    missing = retrain_module.retrain(data=str(small_dataset), store="s3://no-such-bucket-secrets/p", train=train,
                                     gate_config=LENIENT, validation=VALIDATION, return_state=True)
    assert missing.is_failed() and "does not exist" in missing.message
    cli_error = protein_process.run("models", "list", "--store", "s3://no-such-bucket-secrets/p", env=ONE_THREAD)
    assert cli_error.returncode == 3

    found: dict[str, list[str]] = {"secret": [], "token": [], "key_id": [], "presigned": []}
    assert any(r.name.startswith("protein.") for r in log_records)
    assert any(r.name.startswith("prefect.task_runs") for r in log_records)
    for record in log_records:
        leaks(f"log {record.name}", handler_format(record), found)
    leaks("flow state messages", f"{ok.message} {missing.message}", found)
    leaks("cli stderr", cli_error.stdout + cli_error.stderr, found)
    flow_run_ids = [ok.state_details.flow_run_id, missing.state_details.flow_run_id]
    records = list(prefect_records(flow_run_ids))
    assert any(where.startswith("artifact ") for where, _ in records)
    assert any(where.startswith("prefect log") for where, _ in records)
    for where, text in records:
        leaks(where, text, found)
    client = boto3.session.Session().client("s3")
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in objects) and any("report.json" in k for k in objects)
    for key in objects:
        leaks(f"s3 object {key}", client.get_object(Bucket=bucket, Key=key)["Body"].read(), found)
    database = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]).parent
    roots = [tmp_path, Path(os.environ["PREFECT_HOME"]), database]
    scanned = 0
    for root in roots:
        for path in files_under(root):
            leaks(f"file {path}", path.read_bytes(), found)
            scanned += 1
    assert scanned > 10

    assert found["secret"] == [], found["secret"]
    assert found["token"] == [], found["token"]
    assert found["key_id"] == [], found["key_id"]
    assert found["presigned"] == [], f"presigned URLs persisted in: {found['presigned']}"
    print(f"\nsecrets: scanned {len(log_records)} log records, {len(records)} Prefect API records, "
          f"{len(objects)} S3 objects, {scanned} files; no presigned URL in any")
