"""What a user sees when S3 refuses: one line that names the URI and the cause, never the secret
(a missing bucket, an endpoint that does not answer or goes away, no or wrong credentials), and
under IAM the refused action and key, so the policy can be fixed. Against real moto servers."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Iterator

import pytest

from protein.errors import NotFound, StoreError
from protein.storage import open_store
from tests.conftest import MotoServer, running_moto_server, set_s3_env

pytestmark = pytest.mark.integration

FAKE_SECRET = "SECRETfake1234567890"


# --- S3 failures: one line, naming the URI and the cause, never the secret -----------------------------


def assert_clean(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    assert FAKE_SECRET not in str(exc)
    assert FAKE_SECRET not in caplog.text
    assert "\n" not in str(exc)


def test_missing_bucket(s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    bucket = f"nope-{uuid.uuid4().hex[:12]}"
    store = open_store(f"s3://{bucket}/x")
    caplog.set_level(logging.DEBUG, logger="protein")
    for call in (store.check, lambda: store.get_bytes("k"), lambda: store.exists("k"), lambda: store.etag("k")):
        with pytest.raises(StoreError, match="does not exist") as info:
            call()
        assert not isinstance(info.value, NotFound)
        assert str(info.value) == f"s3://{bucket}/x: bucket '{bucket}' does not exist"
        assert_clean(info.value, caplog)
    with pytest.raises(StoreError, match="does not exist"):
        store.put_bytes("k", b"x")


def test_unreachable_endpoint_fails_fast(
    s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, closed_port: int
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")  # nothing listens there
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    caplog.set_level(logging.DEBUG, logger="protein")
    store = open_store("s3://some-bucket/p")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as info:
        store.check()
    assert time.monotonic() - started < 10
    assert str(info.value).startswith("s3://some-bucket/p: ")
    assert_clean(info.value, caplog)
    with pytest.raises(StoreError, match="cannot reach"):
        store.put_bytes("k", b"x")


def test_credentials_in_the_endpoint_url_are_in_no_error_nor_its_traceback(
    s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    """botocore's own error names the endpoint URL whole; Prefect logs a failed task's exception
    chain into its database, so the store's one-line error carries no botocore cause."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://AKIAUSER:{FAKE_SECRET}@127.0.0.1:{closed_port}")
    store = open_store("s3://some-bucket/p")
    for call in (store.check, lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"x")):
        with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as info:
            call()
        shown = "".join(traceback.format_exception(info.value))
        assert FAKE_SECRET not in shown and "AKIAUSER" not in shown, shown


def test_server_going_away_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    # A server of its own: stopping the session's server would empty every other test's buckets.
    with running_moto_server() as server:
        set_s3_env(monkeypatch, server.endpoint)
        boto3.session.Session().client("s3").create_bucket(Bucket="going-away")
        store = open_store("s3://going-away/prefix")
        store.put_bytes("k", b"x")
        server.stop()
        try:
            with pytest.raises(StoreError, match="cannot reach"):
                store.get_bytes("k")
        finally:
            server.start()
        # The server keeps state in memory only, so the bucket is gone; the same store object recovers.
        with pytest.raises(StoreError, match="does not exist"):
            store.check()


def test_no_credentials(s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no AWS credentials found in the standard chain"):
        open_store("s3://some-bucket/p").check()


@pytest.fixture(scope="module")
def s3_server_enforcing_auth() -> Iterator[MotoServer]:
    # moto accepts any credentials unless told to check them against its own IAM from the first request.
    with running_moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as server:
        yield server


def test_wrong_credentials(
    s3_server_enforcing_auth: MotoServer,
    s3_env: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server_enforcing_auth.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    caplog.set_level(logging.DEBUG, logger="protein")
    store = open_store("s3://some-bucket/p")
    # Every call here has a response body naming the rejected key id (the check lists one key, no HEAD).
    expected = {
        "check": "s3://some-bucket/p: S3 rejected the credentials (InvalidAccessKeyId) on s3:ListBucket; check the "
                 "access key, secret and session token in the standard chain",
        "get": "s3://some-bucket/p/k: S3 rejected the credentials (InvalidAccessKeyId) on s3:GetObject; check the "
               "access key, secret and session token in the standard chain",
        "put": "s3://some-bucket/p/k: S3 rejected the credentials (InvalidAccessKeyId) on s3:PutObject; check the "
               "access key, secret and session token in the standard chain",
        "list": "s3://some-bucket/p: S3 rejected the credentials (InvalidAccessKeyId) on s3:ListBucket; check the "
                "access key, secret and session token in the standard chain",
    }
    calls = {"check": store.check, "get": lambda: store.get_bytes("k"), "put": lambda: store.put_bytes("k", b"x"),
             "list": store.list}
    for name, call in calls.items():
        with pytest.raises(StoreError, match=f"^{re.escape(expected[name])}$") as info:
            call()
        assert str(info.value) == expected[name]
        assert info.value.exit_code == 3
        assert_clean(info.value, caplog)


# --- IAM: a refused action is named, so the policy can be fixed -----------------------------------------


@pytest.fixture(scope="module")
def s3_server_with_iam() -> Iterator[MotoServer]:
    # The first 4 requests (bucket, user, policy, access key) are let through unauthenticated; every
    # later one is checked against moto's IAM.
    with running_moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as server:
        yield server


def test_access_denied_names_the_refused_action_and_the_key(
    s3_server_with_iam: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    import boto3

    from tests.conftest import set_s3_env

    set_s3_env(monkeypatch, s3_server_with_iam.endpoint)
    bucket = f"iam-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    iam = boto3.session.Session().client("iam")
    iam.create_user(UserName="reader")
    actions = ["s3:GetObject", "s3:ListBucket"]
    resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}]}
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    set_s3_env(monkeypatch, s3_server_with_iam.endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    caplog.set_level(logging.DEBUG, logger="protein")

    store = open_store(f"s3://{bucket}/p")
    assert store.list() == []  # allowed
    store.check()  # a read-only caller passes: it never writes, so conditional writes do not concern it
    with pytest.raises(NotFound, match="models/v/model.json"):
        store.get_bytes("models/v/model.json")  # allowed, and missing
    denied = {
        "s3:PutObject": lambda: store.put_bytes("models/v/model.json", b"{}"),
        "s3:DeleteObject": lambda: store.delete("models/v/model.json"),
    }
    for action, call in denied.items():
        with pytest.raises(StoreError, match=f"access denied: {action} was refused") as info:
            call()
        assert str(info.value) == (
            f"s3://{bucket}/p/models/v/model.json: access denied: {action} was refused; the caller's credentials "
            "lack this permission (check the IAM policy of the role or user)"
        )
        assert info.value.exit_code == 3
        assert key["SecretAccessKey"] not in caplog.text and key["SecretAccessKey"] not in str(info.value)
