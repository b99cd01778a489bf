"""One object-store interface over S3-compatible buckets and local folders.

A store is addressed by a URI: ``s3://bucket/prefix`` or a local folder (a plain path or a ``file://``
URI). Keys are relative, '/'-separated names checked by `validate_key`.

Every object written records its SHA-256 and every read checks it (`IntegrityError` on mismatch);
objects written by other tools (no recorded hash) are read unchecked, with a warning. Compare-and-swap
(``if_match`` / ``if_none_match``) is S3's own conditional writes, or read-compare-write under a lock
locally.

- `base`: the `Store` protocol, key rules and shared helpers
- `local`: `LocalStore`, a folder with SHA-256 sidecars
- `s3`: `S3Store`, with streamed downloads and create-only multipart uploads
- `s3_conditional_writes`: the probe `S3Store.check` runs to prove the endpoint honours conditional writes
- `s3_errors`: the one mapping from botocore/boto3 failures to one-line `StoreError`s
- `s3_raw_objects`: reading objects other tools wrote (dataset prefixes) by their raw bucket keys
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from protein.storage.base import (
    MAX_KEY_LENGTH,
    SHA256_METADATA,
    ListedObject,
    ObjectInfo,
    Store,
    is_valid_key,
    validate_key,
    validate_prefix,
)
from protein.storage.local import LOCAL_META_DIR, LocalStore
from protein.storage.s3 import ALLOW_LAST_WRITER_WINS_ENV, S3Store, misspelled_s3_uri
from protein.storage.s3_clients import redacted_uri

__all__ = [
    "ALLOW_LAST_WRITER_WINS_ENV",
    "LOCAL_META_DIR",
    "MAX_KEY_LENGTH",
    "SHA256_METADATA",
    "ListedObject",
    "LocalStore",
    "ObjectInfo",
    "S3Store",
    "Store",
    "is_valid_key",
    "open_store",
    "validate_key",
    "validate_prefix",
]


def open_store(uri: str) -> Store:
    """Open the store at ``uri`` without touching it: no network, nothing created until a write."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("store URI must be a non-empty string")
    uri = uri.strip()
    misspelled = misspelled_s3_uri(uri)
    if misspelled is not None:
        raise ValueError(f"{misspelled}: not a store URI (expected s3://bucket/prefix, or a local folder "
                         "whose name does not start with 's3:' or 's3//')")
    if uri.startswith("s3://"):
        return S3Store.from_uri(uri)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{redacted_uri(uri)}: file:// URIs must name a local path (no host)")
        return LocalStore(Path(url2pathname(parts.path)))
    if "://" in uri:
        raise ValueError(f"{redacted_uri(uri)}: unsupported store URI (use s3://bucket/prefix or a local folder)")
    return LocalStore(Path(uri))
