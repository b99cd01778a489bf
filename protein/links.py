"""Links to stored objects. Artifacts, task results, reports and events keep durable URIs
(``s3://bucket/key``, ``file:///path``); a presigned URL is made only when a person asks for a
link to open (`protein link URI`), and lives at most 7 days (S3's SigV4 limit). A presigned URL
written into the Prefect database would leak access to anyone who can read it and stop working
an hour later."""

from __future__ import annotations

from pathlib import Path

from protein.storage import Store, open_store, validate_key
from protein.storage.s3 import split_s3_uri
from protein.storage.s3_clients import redacted_uri

MAX_LINK_S = 7 * 24 * 3600
DEFAULT_LINK_S = 24 * 3600


def object_uri(store: Store, key: str) -> str:
    """The durable address of ``key`` in ``store``: s3:// on S3, file:// locally."""
    uri = f"{store.uri.rstrip('/')}/{validate_key(key)}"
    return uri if uri.startswith("s3://") else Path(uri).as_uri()


def shareable_url(uri: str, expires_s: int = DEFAULT_LINK_S) -> str:
    """A link a browser can open: presigned for ``expires_s`` (1 s .. 7 days) on S3; a local
    file:// URI (or path) is returned as a file:// URI."""
    if not 1 <= expires_s <= MAX_LINK_S:
        raise ValueError(f"link lifetime must be 1..{MAX_LINK_S} s (7 days), got {expires_s}")
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        if not bucket or not key:
            raise ValueError(f"{redacted_uri(uri)}: expected s3://bucket/key")
        return open_store(f"s3://{bucket}").url(key, expires_s=expires_s)
    if uri.startswith("file://"):
        return uri
    if "://" in uri:
        raise ValueError(f"{redacted_uri(uri)}: unsupported URI (use s3://bucket/key or a local path)")
    return Path(uri).resolve().as_uri()
