"""One object-store interface over S3-compatible buckets and local folders.

A store is addressed by a URI: ``s3://bucket/prefix`` (AWS, MinIO, Ceph, R2, ...) or a local folder
(a plain path or a ``file://`` URI). Keys are relative, '/'-separated names checked by `validate_key`.

Every object written records its SHA-256, and every read checks it (`IntegrityError` on mismatch):

- S3: user metadata ``sha256`` on the object itself (``x-amz-meta-sha256``), so the hash travels with
  the object and needs no second request.
- Local: a sidecar file ``<root>/.protein+meta/sha256/<key>`` holding the hex digest. The ``+`` cannot
  occur in a key, so no key can collide with the metadata folder, and `Store.list` never shows it.
  The same folder holds the lock file and the temp files of writes in progress.

Objects written by other tools (no recorded hash) are read unchecked, with a warning.

Compare-and-swap (`put_bytes` with ``if_match`` / ``if_none_match``) uses S3's own conditional writes;
locally it is read-compare-write under an exclusive ``fcntl.flock`` (so POSIX only), and the local etag
is the SHA-256 hex of the content. S3 endpoint, region and credentials come only from boto3's
standard chain (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``..., profiles,
roles); path-style addressing for MinIO-like services is set there too (``s3.addressing_style``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit
from urllib.request import url2pathname

from protein.errors import IntegrityError, NotFound, PreconditionFailed, StoreError

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_KEY_LENGTH = 512
SHA256_METADATA = "sha256"
# Holds sidecars, the lock file and temp files; '+' is outside the key alphabet, so never a key.
LOCAL_META_DIR = ".protein+meta"
COPY_CHUNK_SIZE = 1 * MiB

# Small connect timeout and few attempts: an unreachable endpoint must fail in seconds, not minutes.
S3_MAX_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 2.0
S3_READ_TIMEOUT_S = 60.0
# Read when each transfer starts (not at import), so tests can shrink them to exercise multipart.
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
# A download whose object is replaced mid-way is retried this often before giving up.
DOWNLOAD_RACE_RETRIES = 2

_KEY_PART = re.compile(r"[A-Za-z0-9._=-]+")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,62}")
_ACCESS_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "InvalidClientTokenId",
        "403",
    }
)
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True)
class ObjectInfo:
    """One S3 object as a listing shows it: its full key in the bucket, size and ETag (quotes kept)."""

    key: str
    size: int
    etag: str


@runtime_checkable
class Store(Protocol):
    """A flat namespace of objects under one root; see the module docstring for the guarantees."""

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

    def get_bytes(self, key: str) -> bytes:
        """Read a whole object, checking its SHA-256; `NotFound` if it is missing."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file (multipart on S3 above `MULTIPART_THRESHOLD`)."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """Download to a temp file beside ``path``, check its SHA-256, then atomically rename."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, not only whole folders)."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing one is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key `list` returns for a non-empty ``prefix``; returns how many."""
        ...

    def etag(self, key: str) -> str | None:
        """Opaque token for ``put_bytes(if_match=...)``; None if the object is missing."""
        ...

    def url(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL on S3, a ``file://`` URI locally."""
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


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def _validate_prefix(prefix: str) -> str:
    # A prefix is a key, optionally ending in '/' to mean "inside this folder"; "" means everything.
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def open_store(uri: str) -> Store:
    """Open the store at ``uri`` without touching it: no network, nothing created until a write."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("store URI must be a non-empty string")
    uri = uri.strip()
    if uri.startswith("s3://"):
        return S3Store.from_uri(uri)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri}: file:// URIs must name a local path (no host)")
        return LocalStore(Path(url2pathname(parts.path)))
    if "://" in uri:
        raise ValueError(f"{uri}: unsupported store URI (use s3://bucket/prefix or a local folder)")
    return LocalStore(Path(uri))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(COPY_CHUNK_SIZE):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def _verify(uri: str, expected: str | None, actual: str) -> None:
    if expected is None:
        logger.warning("%s: no sha256 recorded (written by another tool?); read without verification", uri)
    elif expected.lower() != actual:
        raise IntegrityError(f"{uri}: checksum mismatch (expected {expected[:16]}.., got {actual[:16]}..)")


def _new_temp(folder: Path, prefix: str) -> tuple[Path, int]:
    # os.open with 0o666 (not mkstemp's 0o600) so the final object gets the usual umask permissions.
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / f"{prefix}{secrets.token_hex(8)}.tmp"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _temp_beside(path: Path) -> tuple[Path, IO[bytes]]:
    tmp, fd = _new_temp(path.parent, f".{path.name}.")
    return tmp, os.fdopen(fd, "wb")


def _env_number(name: str, default: float) -> float:
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


class LocalStore:
    """A folder on a local (POSIX) filesystem; see the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.uri = str(self.root)
        self._meta = self.root / LOCAL_META_DIR
        self._sidecars = self._meta / "sha256"
        self._tmp = self._meta / "tmp"

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _uri(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @contextmanager
    def _os_errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            where = self._uri(key) if key else self.uri
            raise StoreError(f"{where}: {exc.strerror or type(exc).__name__}") from exc

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        # Readers take the lock shared so they never pair new bytes with an old sidecar (or vice versa).
        lock_path = self._meta / "lock"
        if exclusive:
            self._meta.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        else:
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                # Never written by this module: no sidecars to keep consistent, and reads create nothing.
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read_sidecar(self, key: str) -> str | None:
        try:
            return (self._sidecars / key).read_text(encoding="ascii").strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _current_etag(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return self._read_sidecar(key) or _sha256_file(path)

    def _write_temp(self, data: bytes | bytearray | memoryview | IO[bytes]) -> tuple[Path, str]:
        tmp, fd = _new_temp(self._tmp, "put-")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                    digest = hashlib.sha256(data).hexdigest()
                else:
                    digest = _copy_hashing(data, f)
                f.flush()
                # fsync before the rename, or a crash could leave a complete-looking empty object.
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest

    def _commit(self, key: str, tmp: Path, digest: str) -> None:
        # Caller holds the exclusive lock. Sidecar first: a crash in between leaves a mismatch that
        # reads report, never an unverified new object.
        target = self._path(key)
        if target.is_dir():
            raise StoreError(f"{self._uri(key)}: a folder of other objects has this name")
        target.parent.mkdir(parents=True, exist_ok=True)
        sidecar = self._sidecars / key
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        side_tmp, _ = self._write_temp(f"{digest}\n".encode("ascii"))
        os.replace(side_tmp, sidecar)
        os.replace(tmp, target)

    def _prune_empty_dirs(self, start: Path, stop: Path) -> None:
        # Leftover empty folders would block a later object with the folder's name.
        while start != stop and stop in start.parents:
            try:
                start.rmdir()
            except OSError:
                return
            start = start.parent

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        validate_key(key)
        if if_match is not None and if_none_match:
            raise ValueError("pass if_match or if_none_match, not both")
        # content_type has no local equivalent; accepted so callers need not care which backend they use.
        with self._os_errors(key):
            tmp, digest = self._write_temp(data)
            try:
                with self._locked(exclusive=True):
                    if if_none_match or if_match is not None:
                        current = self._current_etag(key)
                        if if_none_match and current is not None:
                            raise PreconditionFailed(f"{self._uri(key)}: already exists")
                        if if_match is not None and current != if_match:
                            state = "does not exist" if current is None else "changed since its etag was read"
                            raise PreconditionFailed(f"{self._uri(key)}: {state}")
                    self._commit(key, tmp, digest)
            finally:
                tmp.unlink(missing_ok=True)
        logger.debug("wrote %s (%d bytes)", self._uri(key), len(data))
        return digest

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._os_errors(key):
            with self._locked(exclusive=False):
                try:
                    # Once open, the bytes stay the ones the sidecar describes even if a writer replaces
                    # the file, so the lock is not held while reading.
                    f = open(path, "rb")  # noqa: SIM115
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise NotFound(f"{self._uri(key)}: not found") from None
                expected = self._read_sidecar(key)
            with f:
                data = f.read()
        _verify(self._uri(key), expected, hashlib.sha256(data).hexdigest())
        return data

    def put_file(self, key: str, path: Path) -> None:
        validate_key(key)
        # Opened outside _os_errors: a missing source is the caller's error, not the store's.
        with open(path, "rb") as src, self._os_errors(key):
            tmp, digest = self._write_temp(src)
            try:
                with self._locked(exclusive=True):
                    self._commit(key, tmp, digest)
            finally:
                tmp.unlink(missing_ok=True)
        logger.debug("uploaded %s to %s", path, self._uri(key))

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        path = Path(path)
        with self._os_errors(key), self._locked(exclusive=False):
            try:
                src = open(source, "rb")  # noqa: SIM115
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFound(f"{self._uri(key)}: not found") from None
            expected = self._read_sidecar(key)
        with src:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, dst = _temp_beside(path)
            try:
                with dst:
                    with self._os_errors(key):
                        actual = _copy_hashing(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                _verify(self._uri(key), expected, actual)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the folder the prefix names (up to its last '/'), not the whole store.
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        keys: list[str] = []
        with self._os_errors():
            for dirpath, dirnames, filenames in os.walk(start):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                base = "" if rel == "." else f"{rel}/"
                dirnames[:] = sorted(
                    d
                    for d in dirnames
                    if d != LOCAL_META_DIR and (f"{base}{d}/".startswith(prefix) or prefix.startswith(f"{base}{d}/"))
                )
                keys.extend(
                    f"{base}{name}"
                    for name in filenames
                    if f"{base}{name}".startswith(prefix) and _is_valid_key(f"{base}{name}")
                )
        return sorted(keys)

    def _delete_locked(self, key: str) -> None:
        target = self._path(key)
        if target.is_dir():
            return  # a folder of other objects, not an object: nothing to delete under this key
        with suppress(FileNotFoundError, NotADirectoryError):
            target.unlink()
        sidecar = self._sidecars / key
        with suppress(FileNotFoundError, NotADirectoryError):
            sidecar.unlink()
        self._prune_empty_dirs(target.parent, self.root)
        self._prune_empty_dirs(sidecar.parent, self._sidecars)

    def delete(self, key: str) -> None:
        validate_key(key)
        if not self.root.is_dir():
            return  # nothing was ever written; do not create the store just to delete from it
        with self._os_errors(key), self._locked(exclusive=True):
            self._delete_locked(key)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        keys = self.list(prefix)
        if keys:
            with self._os_errors(prefix), self._locked(exclusive=True):
                for key in keys:
                    self._delete_locked(key)
        return len(keys)

    def etag(self, key: str) -> str | None:
        validate_key(key)
        with self._os_errors(key), self._locked(exclusive=False):
            return self._current_etag(key)

    def url(self, key: str, expires_s: int = 3600) -> str:
        # Local paths do not expire; expires_s is accepted so callers need not care about the backend.
        return self._path(key).as_uri()

    def clean_stale_uploads(self, older_than_s: float = 3600, dry_run: bool = False) -> int:
        # Only old files: a younger one may belong to a write in progress in another process.
        if not self._tmp.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        stale = [p for p in self._tmp.iterdir() if p.is_file() and p.stat().st_mtime < cutoff]
        if not dry_run:
            for path in stale:
                path.unlink(missing_ok=True)
        return len(stale)

    def check(self) -> None:
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"{self.uri}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"{self.uri}: folder {existing} is not writable")


class S3Store:
    """A prefix in an S3-compatible bucket. The client is created on first use, not at open time."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"s3://{bucket}: invalid bucket name")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except ValueError as exc:
                raise ValueError(f"s3://{bucket}/{prefix}: invalid prefix ({exc})") from None
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        # Re-entrant: translating an error may need the client (to tell a missing bucket from a key).
        self._client_lock = threading.RLock()
        self._client_obj: Any = None
        # A HEAD on a missing bucket and on a missing key both answer a bare 404; once the bucket is
        # known to exist, a 404 means the key.
        self._bucket_seen = False

    @classmethod
    def from_uri(cls, uri: str) -> S3Store:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return cls(bucket, prefix)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def _uri(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _root_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                import boto3.session
                from botocore.config import Config

                config = Config(
                    retries={
                        "mode": "standard",
                        # total_max_attempts counts the first try; botocore's "max_attempts" key here
                        # would count retries only (one attempt more than the name says).
                        "total_max_attempts": int(_env_number("PROTEIN_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)),
                    },
                    connect_timeout=_env_number("PROTEIN_S3_CONNECT_TIMEOUT_S", S3_CONNECT_TIMEOUT_S),
                    read_timeout=_env_number("PROTEIN_S3_READ_TIMEOUT_S", S3_READ_TIMEOUT_S),
                    # boto3 presigns S3 URLs with the deprecated SigV2 unless told otherwise; R2 and
                    # newer AWS regions accept only SigV4.
                    signature_version="s3v4",
                )
                with self._translating():
                    self._client_obj = boto3.session.Session().client("s3", config=config)
            return self._client_obj

    def _endpoint(self) -> str:
        endpoint = getattr(getattr(self._client_obj, "meta", None), "endpoint_url", None)
        if not endpoint:
            return ""
        parts = urlsplit(endpoint)
        # Never echo user:password@ should someone have put credentials into the endpoint URL.
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f" {parts.scheme}://{host}{port}"

    def _no_bucket(self) -> StoreError:
        return StoreError(f"{self.uri}: bucket '{self.bucket}' does not exist")

    def _error(self, exc: BaseException, key: str | None = None) -> StoreError:
        """One-line StoreError for a boto error; messages are built here, never from credentials."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore import exceptions as bce

        uri = self._uri(key)
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            exc = exc.__context__  # boto3 re-raises the real ClientError as a plain-text wrapper
        if isinstance(exc, RetriesExceededError) and isinstance(exc.last_exception, Exception):
            exc = exc.last_exception
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            return StoreError(f"{uri}: no AWS credentials found in the standard chain")
        if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError | bce.ConnectionClosedError):
            return StoreError(f"{uri}: cannot reach the S3 endpoint{self._endpoint()}")
        if isinstance(exc, bce.ReadTimeoutError):
            return StoreError(f"{uri}: the S3 endpoint{self._endpoint()} did not answer in time")
        if isinstance(exc, bce.ProfileNotFound | bce.NoRegionError):
            return StoreError(f"{uri}: {exc}")
        if isinstance(exc, bce.ClientError):
            code, status = _error_code(exc)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in _NOT_FOUND_CODES:
                return NotFound(f"{uri}: not found")
            if code in _ACCESS_DENIED_CODES or status == 403:
                return StoreError(f"{uri}: access denied (check credentials)")
            if code in _PRECONDITION_CODES or status == 412:
                return PreconditionFailed(f"{uri}: precondition failed (changed concurrently)")
            return StoreError(f"{uri}: S3 request failed ({code or status})")
        if isinstance(exc, bce.BotoCoreError):
            return StoreError(f"{uri}: S3 client error ({type(exc).__name__})")
        return StoreError(f"{uri}: {type(exc).__name__}")

    @contextmanager
    def _translating(self, key: str | None = None) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            error = self._error(exc, key)
            if isinstance(error, NotFound) and not self._bucket_seen:
                self._require_bucket()  # a bare 404 may mean the bucket, not the key
            raise error from exc

    def _require_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client().head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code, status = _error_code(exc)
            if code in _NOT_FOUND_CODES | {"NoSuchBucket"} or status == 404:
                raise self._no_bucket() from exc
            raise self._error(exc) from exc
        except Exception as exc:
            if _is_boto_error(exc):
                raise self._error(exc) from exc
            raise
        self._bucket_seen = True

    def _head(self, key: str) -> dict[str, Any] | None:
        object_key = self._object_key(key)
        client = self._client()
        try:
            with self._translating(key):
                return client.head_object(Bucket=self.bucket, Key=object_key)
        except NotFound:
            return None

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # classic: the CRT client (if installed) has its own thresholds and would ignore these.
        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            preferred_transfer_client="classic",
        )

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        object_key = self._object_key(key)
        if if_match is not None and if_none_match:
            raise ValueError("pass if_match or if_none_match, not both")
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": object_key,
            "Body": data,
            "Metadata": {SHA256_METADATA: hashlib.sha256(data).hexdigest()},
        }
        if content_type:
            args["ContentType"] = content_type
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        client = self._client()
        try:
            with self._translating(key):
                response = client.put_object(**args)
        except NotFound as exc:
            if if_match is None:
                raise
            # S3 answers a conditional write on a missing key with 404, but for the caller the swap lost.
            raise PreconditionFailed(f"{self._uri(key)}: does not exist") from exc
        except PreconditionFailed as exc:
            state = "already exists" if if_none_match else "changed since its etag was read"
            raise PreconditionFailed(f"{self._uri(key)}: {state}") from exc
        logger.debug("wrote %s (%d bytes)", self._uri(key), len(data))
        return str(response["ETag"])

    def get_bytes(self, key: str) -> bytes:
        object_key = self._object_key(key)
        client = self._client()
        with self._translating(key):
            response = client.get_object(Bucket=self.bucket, Key=object_key)
            data = response["Body"].read()
        expected = response.get("Metadata", {}).get(SHA256_METADATA)
        _verify(self._uri(key), expected, hashlib.sha256(data).hexdigest())
        return data

    def put_file(self, key: str, path: Path) -> None:
        object_key = self._object_key(key)
        # Hashed before the upload so the hash rides along as metadata; a missing source raises
        # FileNotFoundError (the caller's error, not the store's).
        digest = _sha256_file(Path(path))
        client = self._client()
        with self._translating(key):
            client.upload_file(
                str(path),
                self.bucket,
                object_key,
                ExtraArgs={"Metadata": {SHA256_METADATA: digest}},
                Config=self._transfer_config(),
            )
        logger.debug("uploaded %s to %s", path, self._uri(key))

    def get_file(self, key: str, path: Path) -> None:
        object_key = self._object_key(key)
        path = Path(path)
        client = self._client()
        for attempt in range(DOWNLOAD_RACE_RETRIES + 1):
            head = self._head(key)
            if head is None:
                raise NotFound(f"{self._uri(key)}: not found")
            expected = head.get("Metadata", {}).get(SHA256_METADATA)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, f = _temp_beside(path)
            f.close()
            try:
                with self._translating(key):
                    client.download_file(self.bucket, object_key, str(tmp), Config=self._transfer_config())
                actual = _sha256_file(tmp)
                if expected is not None and expected.lower() != actual and attempt < DOWNLOAD_RACE_RETRIES:
                    # A writer may have replaced the object between our HEAD and the download: that is
                    # a race to retry, not corruption.
                    current = self._head(key)
                    if current is not None and current.get("ETag") != head.get("ETag"):
                        continue
                _verify(self._uri(key), expected, actual)
                os.replace(tmp, path)
                return
            finally:
                tmp.unlink(missing_ok=True)
        raise StoreError(f"{self._uri(key)}: kept changing during download")  # pragma: no cover

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        root = self._root_prefix()
        client = self._client()
        keys: list[str] = []
        with self._translating():
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    # Folder markers ("x/") and names other tools wrote outside the key alphabet are
                    # skipped: every key list() returns must be usable with the other methods.
                    if _is_valid_key(key):
                        keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        client = self._client()
        with self._translating(key):
            client.delete_object(Bucket=self.bucket, Key=object_key)

    def clean_stale_uploads(self, older_than_s: float = 3600, dry_run: bool = False) -> int:
        # An interrupted multipart upload is invisible to GET/LIST but its parts cost storage.
        client = self._client()
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)
        stale: list[tuple[str, str]] = []
        with self._translating():
            paginator = client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root_prefix()):
                stale += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", []) if u["Initiated"] < cutoff]
            if not dry_run:
                for object_key, upload_id in stale:
                    client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
        return len(stale)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        keys = self.list(prefix)
        client = self._client()
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            with self._translating(prefix):
                response = client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._object_key(k)} for k in batch], "Quiet": True},
                )
            if errors := response.get("Errors"):
                first = errors[0]
                raise StoreError(
                    f"{self._uri(prefix)}: could not delete {len(errors)} objects "
                    f"(first: {first.get('Key')}: {first.get('Code')})"
                )
        return len(keys)

    def etag(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else str(head["ETag"])

    def url(self, key: str, expires_s: int = 3600) -> str:
        object_key = self._object_key(key)
        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise ValueError(f"expires_s must be 1..604800 (7 days), got {expires_s}")
        client = self._client()
        with self._translating(key):
            return str(
                client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": object_key}, ExpiresIn=expires_s
                )
            )

    def check(self) -> None:
        self._bucket_seen = False
        self._require_bucket()

    # --- reading objects other tools wrote (datasets): raw bucket keys, never used to write ---
    # Keys such as "jovian/Human protein atlas/train.csv" fall outside `validate_key`'s alphabet; these
    # methods take the full key in the bucket as listed, ignore the store's prefix, and only read.

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose full key starts with ``prefix``, with its size and ETag, sorted by key."""
        client = self._client()
        found: list[ObjectInfo] = []
        with self._translating(prefix or None):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                found += [ObjectInfo(o["Key"], int(o["Size"]), str(o["ETag"])) for o in page.get("Contents", [])]
        return sorted(found, key=lambda o: o.key)

    def download_object(self, key: str, dest: IO[bytes], *, if_match: str | None = None, start: int = 0) -> str:
        """Stream the object's bytes from offset ``start`` into ``dest``; returns the ETag served.

        With ``if_match`` the server refuses (`PreconditionFailed`) once the object is no longer that
        version, so a download never mixes the bytes of two versions."""
        client = self._client()
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            args["IfMatch"] = if_match
        if start:
            args["Range"] = f"bytes={start}-"
        with self._translating(key):
            response = client.get_object(**args)
            for chunk in response["Body"].iter_chunks(COPY_CHUNK_SIZE):
                dest.write(chunk)
        return str(response.get("ETag", ""))


def _error_code(exc: ClientError) -> tuple[str, int | None]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _is_boto_error(exc: BaseException) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError | Boto3Error)
