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


def test_the_checksum_settings_docs_registry_md_names_reach_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from the environment by botocore itself: the store's own client settings must not override them."""
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION", raising=False)
    assert open_store("s3://bucket-a")._client().meta.config.request_checksum_calculation == "when_supported"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    config = open_store("s3://bucket-a")._client().meta.config
    assert (config.request_checksum_calculation, config.response_checksum_validation) == ("when_required",) * 2


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


# --- an endpoint URL botocore refuses: never echo its credentials ----------------------------------------

SECRET_ENDPOINT = "http://AKIAEXAMPLE:s3cr3tKEY@bad_host name:9000"


def test_a_refused_endpoint_is_a_store_error_without_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from protein.errors import StoreError

    monkeypatch.setenv("AWS_ENDPOINT_URL", SECRET_ENDPOINT)
    with pytest.raises(StoreError) as info:
        open_store("s3://bucket/x")._client()
    message = str(info.value)
    assert "AKIAEXAMPLE" not in message and "s3cr3tKEY" not in message
    assert message.startswith("s3://bucket/x: invalid S3 endpoint URL http://bad_host name:9000")
    assert info.value.__suppress_context__  # botocore's message, with the URL, is not chained either


def test_the_cli_names_only_scheme_host_and_port_of_a_refused_endpoint(
    monkeypatch: pytest.MonkeyPatch, protein_cli
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", SECRET_ENDPOINT)
    result = protein_cli("models", "list", "--store", "s3://bucket/x")
    assert result.returncode == 3  # the object store's exit code
    assert "AKIAEXAMPLE" not in result.stderr + result.stdout and "s3cr3tKEY" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        "protein models: error: s3://bucket/x: invalid S3 endpoint URL http://bad_host name:9000 "
        "(check AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or ~/.aws/config)"]


@pytest.mark.parametrize(("url", "shown"), [
    ("http://u:p@host:9000/path?X-Amz-Signature=s", "http://host:9000"),
    ("https://user:p@ss/word@minio.local", "https://minio.local"),  # '@' and '/' inside the password
    ("http://host name:99999", "http://host name:99999"),  # a port urlsplit would refuse
    ("AKIA:secret@host", "(not a URL)"),
])
def test_redacted_endpoint_keeps_no_userinfo_path_or_query(url: str, shown: str) -> None:
    from protein.storage.s3_clients import redacted_endpoint

    assert redacted_endpoint(url) == shown
