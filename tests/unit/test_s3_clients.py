"""Stores in one process share an S3 client per environment (protein/storage/s3_clients.py)."""

from __future__ import annotations

import pytest

from protein.storage import open_store
from protein.storage.s3_clients import forget_clients


@pytest.fixture(autouse=True)
def fresh_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_clients()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


def test_stores_of_one_environment_share_a_client() -> None:
    first = open_store("s3://bucket-a/prefix")._client()
    assert open_store("s3://bucket-b")._client() is first
    assert first.meta.endpoint_url == "http://127.0.0.1:9"


def test_a_changed_environment_gets_a_client_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that switches credentials or endpoint (a test, a tool acting for another role)
    must not keep talking with the first one's."""
    first = open_store("s3://bucket-a")._client()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    second = open_store("s3://bucket-a")._client()
    assert second is not first
    assert second.meta.endpoint_url == "http://127.0.0.1:10"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another")
    third = open_store("s3://bucket-a")._client()
    assert third is not second
    assert third._request_signer._credentials.access_key == "another"


def test_a_changed_client_setting_gets_its_own_client(monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_store("s3://bucket-a")._client()
    monkeypatch.setenv("PROTEIN_S3_CONNECT_TIMEOUT_S", "7")
    second = open_store("s3://bucket-a")._client()
    assert second is not first
    assert second.meta.config.connect_timeout == 7


def test_a_forked_process_makes_its_own_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooled connections never cross a fork: a DataLoader worker gets a client of its own."""
    import os

    first = open_store("s3://bucket-a")._client()
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)
    assert open_store("s3://bucket-a")._client() is not first
