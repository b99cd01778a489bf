"""What every store promises (the `Store` protocol), key rules and the helpers both backends share."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from protein.errors import IntegrityError, RecordError

# The package's logger, not this module's: users filter on "protein.storage".
logger = logging.getLogger("protein.storage")

MiB = 1024 * 1024
MAX_KEY_LENGTH = 512
SHA256_METADATA = "sha256"
COPY_CHUNK_SIZE = 1 * MiB

_KEY_PART = re.compile(r"[A-Za-z0-9._=-]+")


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says about one object, without reading it."""

    key: str
    size: int
    modified: float  # seconds since the epoch (UTC)


@dataclass(frozen=True)
class ListedObject:
    """One S3 object as a raw listing shows it: its full key in the bucket, size and ETag (quoted: `quoted_etag`).
    For reading datasets other tools wrote (`S3Store.list_objects`)."""

    key: str
    size: int
    etag: str


@runtime_checkable
class Store(Protocol):
    """A flat namespace of objects under one root; see the package docstring for the guarantees."""

    uri: str

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        """Write an object and return its new etag; `PreconditionFailed` if a condition does not hold."""
        ...

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read a whole object, checking its SHA-256; `NotFound` if it is missing. With ``max_bytes``
        an object larger than that is refused (`RecordError`) from its size, before its body is read,
        and the read stops one byte past the cap whatever the size said."""
        ...

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """Upload a local file (multipart on S3 above the multipart threshold); returns its SHA-256 hex.
        With ``if_none_match`` the write is create-only (`PreconditionFailed` if the key exists)."""
        ...

    def get_file(self, key: str, path: Path) -> str:
        """Download to a temp file beside ``path``, check its SHA-256, then atomically rename;
        returns the SHA-256 hex of the bytes written, so callers can bind them to their own record."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, not only whole folders)."""
        ...

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Like `list`, with each object's size and last-modified time (same request count as `list`)."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing one is not an error."""
        ...

    def delete_keys(self, keys: list[str]) -> int:
        """Delete exactly these keys (batched on S3); returns how many were asked for."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key `list` returns for a non-empty ``prefix``; returns how many."""
        ...

    def etag(self, key: str) -> str | None:
        """Opaque token for ``put_bytes(if_match=...)``; None if the object is missing."""
        ...

    def recorded_sha256(self, key: str) -> tuple[int, str | None] | None:
        """(size, SHA-256 recorded at write time or None) from metadata only; None if missing."""
        ...

    def clock(self) -> float:
        """The store's own time now, in seconds since the epoch: the clock its ``modified`` times are
        stamped by (S3: the end of the second the server's Date header names; a local folder: this
        host's). Ages of objects are measured against it, never against a host clock that may run fast."""
        ...

    def url(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL on S3, a ``file://`` URI locally. For display only: never persist it."""
        ...

    def check(self) -> None:
        """Fail fast with `StoreError` unless the store is reachable and usable."""
        ...

    def clean_stale_uploads(self, older_than_s: float = 3600, dry_run: bool = False) -> int:
        """Remove what interrupted writes left behind (local temp files, unfinished S3 multipart
        uploads) started more than ``older_than_s`` ago; returns how many."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative object key, else raise ValueError."""
    if not isinstance(key, str):
        raise ValueError(f"object key must be a string, got {type(key).__name__}")
    if not key:
        raise ValueError("object key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"object key longer than {MAX_KEY_LENGTH} characters: {key[:40]!r}...")
    for part in key.split("/"):
        if part in (".", "..") or not _KEY_PART.fullmatch(part):
            raise ValueError(
                f"invalid object key {key!r}: use '/'-separated parts of A-Z a-z 0-9 . _ = - "
                "(no leading '/', no empty, '.' or '..' parts)"
            )
    return key


def is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    # A prefix is a key, optionally ending in '/' to mean "inside this folder"; "" means everything.
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashing(src: IO[bytes], dst: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(COPY_CHUNK_SIZE):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def verify(uri: str, expected: str | None, actual: str) -> None:
    if expected is None:
        logger.warning("%s: no sha256 recorded (written by another tool?); read without verification", uri)
    elif expected.lower() != actual:
        raise IntegrityError(f"{uri}: checksum mismatch (expected {expected[:16]}.., got {actual[:16]}..)")


def check_if_match(value: str | None) -> None:
    """A swap condition is the etag the caller read, never a wildcard or an empty value that would let
    the write through whatever the object holds now."""
    if value is not None and (not value.strip() or value.strip().strip('"') in ("", "*")):
        raise ValueError(f"if_match must be the etag read from the object, got {value!r}")


def quoted_etag(value: object) -> str:
    """An S3 ETag in the one form this package hands out and compares: the opaque value in double quotes.
    Ceph RGW (and MinIO before 2020) answer CompleteMultipartUpload with the ETag unquoted where HEAD
    quotes it; compared as given, every multipart object would look changed the moment it was written."""
    return '"' + str(value).strip().strip('"') + '"'


def too_large(uri: str, size: int, max_bytes: int) -> RecordError:
    return RecordError(f"{uri}: {size:,} bytes is larger than the {max_bytes:,}-byte cap for this record; not read")


def read_capped(f: IO[bytes], uri: str, max_bytes: int) -> bytes:
    """At most ``max_bytes`` from ``f``: a body longer than its announced size is cut off at the cap + 1
    and refused, so a lying length never makes the reader hold more than the cap."""
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(uri, len(data), max_bytes)
    return data


def new_temp(folder: Path, prefix: str) -> tuple[Path, int]:
    # os.open with 0o666 (not mkstemp's 0o600) so the final object gets the usual umask permissions.
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / f"{prefix}{secrets.token_hex(8)}.tmp"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def temp_beside(path: Path) -> tuple[Path, IO[bytes]]:
    tmp, fd = new_temp(path.parent, f".{path.name}.")
    return tmp, os.fdopen(fd, "wb")


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value
