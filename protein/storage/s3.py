"""`S3Store`: a prefix in an S3-compatible bucket (AWS, MinIO, Ceph, R2, ...).

Each object's SHA-256 rides along as user metadata ``sha256`` (``x-amz-meta-sha256``), so a read gets
bytes and hash in one response. Compare-and-swap uses S3's own conditional writes (``If-None-Match: *``
and ``If-Match: <etag>``); `check()` proves the endpoint honours both before anything relies on them.
Endpoint, region and credentials come only from boto3's standard chain.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from protein.atomic import fsync_dir
from protein.errors import NotFound, PreconditionFailed, StoreError, UnsupportedRequest
from protein.storage import s3_errors
from protein.storage.base import (
    COPY_CHUNK_SIZE,
    SHA256_METADATA,
    MiB,
    ObjectInfo,
    check_if_match,
    env_number,
    is_valid_key,
    logger,
    quoted_etag,
    read_capped,
    sha256_file,
    temp_beside,
    too_large,
    validate_key,
    validate_prefix,
    verify,
)
from protein.storage.s3_clients import client_setup_error, redacted_endpoint, redacted_uri, shared_client

# Re-exported: these lived here before the probe had a module of its own, and callers import them from here.
from protein.storage.s3_conditional_writes import (  # noqa: F401
    ALLOW_LAST_WRITER_WINS_ENV,
    PROBE_PREFIX,
    last_writer_wins_allowed,
    require_conditional_writes,
)
from protein.storage.s3_raw_objects import RawObjectReads

# Small connect timeout and few attempts: an unreachable endpoint must fail in seconds, not minutes.
S3_MAX_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 2.0
S3_READ_TIMEOUT_S = 60.0
# Read when each upload starts (not at import), so tests can shrink them to exercise multipart.
# A single PUT takes at most 5 GiB; far below that, parts upload in parallel and retry separately.
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
MULTIPART_WORKERS = 8
MAX_PARTS = 10_000  # S3's limit per upload

_BUCKET_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


# `s3:/bucket`, `s3:bucket`, `s3//bucket`, `S3://bucket`: no "://" in the first three, so each named a local
# folder, and a command wrote to local disk and exited 0 where the user meant a bucket.
_MISSPELLED_S3 = re.compile(r"(?i)s3(:|//)")


def misspelled_s3_uri(text: str) -> str | None:
    """When ``text`` starts like an s3:// URI but is not one: the text to name it by, without what precedes
    its last '@' (`redacted_uri` finds user info only after "://"). Else None."""
    if not _MISSPELLED_S3.match(text) or text.startswith("s3://"):
        return None
    if "://" in text:
        return redacted_uri(text)
    return f"(hidden)@{text.rpartition('@')[2]}" if "@" in text else text


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Bucket and key (or prefix) of ``s3://bucket/key``. A URI carrying user info (``s3://KEY:SECRET@bucket``)
    or a host:port before the bucket is refused, named without what precedes its last '@': a secret key
    may hold '/', so the text up to the first '/' need not be the whole user info."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if "@" in bucket or ":" in bucket:
        shown = redacted_uri(uri) if "@" in uri else f"s3://(hidden)/{key}"
        raise ValueError(f"{shown}: credentials or an endpoint in an s3:// URI are not accepted (name "
                         "s3://bucket/prefix; credentials and endpoint come from boto3's standard chain)")
    return bucket, key


class S3Store(RawObjectReads):
    """A prefix in an S3-compatible bucket. The client is created on first use, not at open time."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not (2 <= len(bucket) <= 63 and bucket[0].isalnum() and set(bucket) <= _BUCKET_NAME_CHARS):
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
        self.conditional_writes_verified: bool | None = None  # set by check()
        # Re-entrant: translating an error may need the client (to tell a missing bucket from a key).
        self._client_lock = threading.RLock()
        self._client_obj: Any = None
        # A HEAD on a missing bucket and on a missing key both answer a bare 404; once the bucket is
        # known to exist, a 404 means the key.
        self._bucket_seen = False

    @classmethod
    def from_uri(cls, uri: str) -> S3Store:
        return cls(*split_s3_uri(uri))

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
                settings = {
                    "retries": {
                        "mode": "standard",
                        # total_max_attempts counts the first try; botocore's "max_attempts" key here
                        # would count retries only (one attempt more than the name says).
                        "total_max_attempts": int(env_number("PROTEIN_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)),
                    },
                    "connect_timeout": env_number("PROTEIN_S3_CONNECT_TIMEOUT_S", S3_CONNECT_TIMEOUT_S),
                    "read_timeout": env_number("PROTEIN_S3_READ_TIMEOUT_S", S3_READ_TIMEOUT_S),
                    # boto3 presigns S3 URLs with the deprecated SigV2 unless told otherwise; R2 and
                    # newer AWS regions accept only SigV4.
                    "signature_version": "s3v4",
                    "max_pool_connections": max(10, MULTIPART_WORKERS * 2),
                }
                with self._translating():
                    try:
                        self._client_obj = shared_client(settings)
                    except ValueError as exc:  # botocore refuses a bad endpoint URL with a bare ValueError
                        raise StoreError(f"{self.uri}: {client_setup_error(exc)}") from None
            return self._client_obj

    def _endpoint(self) -> str:
        endpoint = getattr(getattr(self._client_obj, "meta", None), "endpoint_url", None)
        if not endpoint:
            return ""
        # Never echo user:password@ should someone have put credentials into the endpoint URL.
        return f" {redacted_endpoint(endpoint)}"

    def _error(self, exc: BaseException, key: str | None = None, operation: str | None = None) -> StoreError:
        return s3_errors.translate(exc, self._uri(key), self._endpoint(), self.uri, self.bucket, operation)

    @contextmanager
    def _translating(self, key: str | None = None, operation: str | None = None) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            error = self._error(exc, key, operation)
            if isinstance(error, NotFound) and not self._bucket_seen:
                # A bare 404 may mean the bucket, not the key. If the bucket cannot be checked (a role
                # without s3:ListBucket), the key's own answer stands.
                try:
                    self._require_bucket()
                except StoreError as bucket_error:
                    if str(bucket_error).endswith("does not exist"):
                        raise
            # Not chained: botocore's own message names the endpoint URL whole, user:password@ too
            # should someone have put credentials there, and Prefect logs a failed task's chain.
            raise error from None

    def _require_bucket(self) -> None:
        from botocore.exceptions import ClientError

        # A one-key listing of the store's own prefix, not HeadBucket: HeadBucket is authorised by an
        # s3:ListBucket without a prefix, which the role policies (deployments/iam/) never grant.
        try:
            self._client().list_objects_v2(Bucket=self.bucket, Prefix=self._root_prefix(), MaxKeys=1)
        except ClientError as exc:
            code, status = s3_errors.error_code(exc)
            if code in s3_errors.NOT_FOUND_CODES | {"NoSuchBucket"} or status == 404:
                raise StoreError(f"{self.uri}: bucket '{self.bucket}' does not exist") from None
            raise self._error(exc) from None  # not chained: see _translating
        except Exception as exc:
            if s3_errors.is_boto_error(exc):
                raise self._error(exc) from None
            raise
        self._bucket_seen = True

    def clock(self) -> float:
        """The server's Date header of a one-key listing of the store's prefix (the request
        `_require_bucket` makes, which every role may)."""
        import email.utils

        with self._translating(operation="ListObjectsV2"):
            response = self._client().list_objects_v2(Bucket=self.bucket, Prefix=self._root_prefix(), MaxKeys=1)
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            raise StoreError(f"{self.uri}: the server's answer carries no Date header; cannot read its clock")
        try:
            stamped = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            raise StoreError(f"{self.uri}: the server's Date header {date!r} is not an HTTP date; cannot read its "
                             "clock") from None
        if stamped.tzinfo is None:  # '-0000' or asctime form: HTTP dates are UTC (RFC 9110), never local time
            stamped = stamped.replace(tzinfo=dt.UTC)
        # Date is truncated to the second: the server's time is within the second after it. The end
        # of that second, so an object written before this request is never younger than "now" (an
        # age guard of 0 takes it); ages are overstated by under a second, against guards of hours.
        return stamped.timestamp() + 1.0

    def _head(self, key: str) -> dict[str, Any] | None:
        object_key = self._object_key(key)
        client = self._client()
        try:
            with self._translating(key):
                return client.head_object(Bucket=self.bucket, Key=object_key)
        except NotFound:
            return None

    # --- writes ---------------------------------------------------------------------------------
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
        check_if_match(if_match)
        metadata = {SHA256_METADATA: hashlib.sha256(data).hexdigest()}
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": object_key, "Body": data, "Metadata": metadata}
        if content_type:
            args["ContentType"] = content_type
        client = self._client()
        try:
            if len(data) > MULTIPART_THRESHOLD:
                # Checkpoints can outgrow a single PUT (5 GiB); parts also retry separately.
                view = memoryview(data)
                etag = self._put_multipart(key, object_key, lambda offset, n: bytes(view[offset:offset + n]),
                                           len(data), metadata, if_none_match, if_match, content_type)
            else:
                conditions = self._condition_headers(key, if_none_match, if_match)
                etag = quoted_etag(self._sending(key, "PutObject", conditions,
                                                 lambda sent: client.put_object(**args, **sent))["ETag"])
        except NotFound as exc:
            if if_match is None:
                raise
            # S3 answers a conditional write on a missing key with 404, but for the caller the swap lost.
            raise PreconditionFailed(f"{self._uri(key)}: does not exist") from exc
        except PreconditionFailed as exc:
            state = "already exists" if if_none_match else "changed since its etag was read"
            raise PreconditionFailed(f"{self._uri(key)}: {state}") from exc
        logger.debug("wrote %s (%d bytes)", self._uri(key), len(data))
        return etag

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        object_key = self._object_key(key)
        path = Path(path)
        # Hashed before the upload so the hash rides along as metadata; a missing source raises
        # FileNotFoundError (the caller's error, not the store's).
        digest = sha256_file(path)
        size = path.stat().st_size
        metadata = {SHA256_METADATA: digest}
        try:
            if size <= MULTIPART_THRESHOLD:
                self._put_single(key, object_key, path, metadata, if_none_match)
            else:
                def read_part(offset: int, length: int) -> bytes:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        return f.read(length)

                self._put_multipart(key, object_key, read_part, size, metadata, if_none_match)
        except PreconditionFailed as exc:
            raise PreconditionFailed(f"{self._uri(key)}: already exists") from exc
        logger.debug("uploaded %s to %s (%d bytes)", path, self._uri(key), size)
        return digest

    def _put_single(self, key: str, object_key: str, path: Path, metadata: dict[str, str], create_only: bool) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": object_key, "Metadata": metadata}
        conditions = self._condition_headers(key, create_only, None)
        client = self._client()
        # Bytes, not a file handle: a retry resends exactly the bytes that were hashed, with no seek on a
        # file that may have changed. Below the multipart threshold, so bounded in memory.
        body = path.read_bytes()
        self._sending(key, "PutObject", conditions, lambda sent: client.put_object(Body=body, **args, **sent))

    def _condition_headers(self, key: str, create_only: bool, if_match: str | None) -> dict[str, str]:
        """What makes a write conditional. Under the last-writer-wins opt-out the conditions are also
        checked by a HEAD just before the write (the endpoint may ignore the headers), so a writer that
        is behind still loses, and two racing between HEAD and write both succeed, the last one winning.
        The headers are still sent (the shipped bucket policy refuses create-only and swap writes
        without them); `_sending` resends without them where the endpoint refuses them (501)."""
        headers = {"IfNoneMatch": "*"} if create_only else {}
        if if_match is not None:
            headers["IfMatch"] = quoted_etag(if_match)
        if headers and last_writer_wins_allowed():
            self._check_before_write(key, create_only, if_match)
        return headers

    def _sending(self, key: str, operation: str, conditions: dict[str, str],
                 write: Callable[[dict[str, str]], Any]) -> Any:
        """`write(conditions)`; under the last-writer-wins opt-out, sent again without them when the
        endpoint refuses them as not implemented (versitygw, s3gw, AWS's If-Match before 2024). An
        opt-out that dropped them always made every write on AWS "access denied" by the bucket policy."""
        try:
            with self._translating(key, operation):
                return write(conditions)
        except UnsupportedRequest:
            if not conditions or not last_writer_wins_allowed():
                raise
        with self._translating(key, operation):
            return write({})

    def _check_before_write(self, key: str, create_only: bool, if_match: str | None) -> None:
        if create_only and self._head(key) is not None:
            raise PreconditionFailed(f"{self._uri(key)}: already exists")
        if if_match is not None and self.etag(key) != quoted_etag(if_match):
            raise PreconditionFailed(f"{self._uri(key)}: changed since its etag was read")

    def _put_multipart(
        self,
        key: str,
        object_key: str,
        read_part: Callable[[int, int], bytes],
        size: int,
        metadata: dict[str, str],
        create_only: bool,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> str:
        # Our own multipart upload, not boto3's upload_file: its transfer manager cannot send
        # If-None-Match / If-Match on CompleteMultipartUpload, which is what makes it conditional.
        # Checked up front too: some endpoints (moto among them) ignore the conditions on
        # CompleteMultipartUpload, and failing before the upload saves sending the parts.
        conditions = self._condition_headers(key, create_only, if_match)
        if conditions and not last_writer_wins_allowed():  # the opt-out's HEAD has checked them already
            self._check_before_write(key, create_only, if_match)
        chunk = max(MULTIPART_CHUNKSIZE, -(-size // MAX_PARTS))
        client = self._client()
        extra = {"ContentType": content_type} if content_type else {}
        with self._translating(key, "CreateMultipartUpload"):
            created = client.create_multipart_upload(Bucket=self.bucket, Key=object_key, Metadata=metadata, **extra)
        upload_id = created["UploadId"]

        def upload_part(number: int) -> dict[str, Any]:
            offset = (number - 1) * chunk
            body = read_part(offset, min(chunk, size - offset))
            with self._translating(key, "UploadPart"):
                response = client.upload_part(Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                                              PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": response["ETag"]}

        try:
            numbers = range(1, -(-size // chunk) + 1)
            with concurrent.futures.ThreadPoolExecutor(MULTIPART_WORKERS) as pool:
                parts = list(pool.map(upload_part, numbers))
            response = self._sending(key, "CompleteMultipartUpload", conditions, lambda sent: (
                client.complete_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                                                 MultipartUpload={"Parts": parts}, **sent)))
        except BaseException:
            # Parts of an abandoned upload are invisible but billed; `clean_stale_uploads` is the
            # backstop when even this abort cannot reach the endpoint.
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
            except Exception as exc:
                logger.warning("%s: could not abort the interrupted multipart upload (%s); "
                               "`protein models gc` removes it later", self._uri(key), self._error(exc, key))
            raise
        return quoted_etag(response["ETag"])

    # --- reads ----------------------------------------------------------------------------------
    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        object_key = self._object_key(key)
        client = self._client()
        with self._translating(key, "GetObject"):
            response = client.get_object(Bucket=self.bucket, Key=object_key)
            body = response["Body"]
            if max_bytes is None:
                data = body.read()
            else:
                with body:
                    if (size := int(response.get("ContentLength") or 0)) > max_bytes:
                        raise too_large(self._uri(key), size, max_bytes)
                    data = read_capped(body, self._uri(key), max_bytes)
        expected = response.get("Metadata", {}).get(SHA256_METADATA)
        verify(self._uri(key), expected, hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, key: str, path: Path) -> str:
        # One GET: body and the recorded hash come in the same response, so no writer can slip
        # between reading the hash and reading the bytes.
        object_key = self._object_key(key)
        path = Path(path)
        client = self._client()
        with self._translating(key, "GetObject"):
            response = client.get_object(Bucket=self.bucket, Key=object_key)
        expected = response.get("Metadata", {}).get(SHA256_METADATA)
        body = response["Body"]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, f = temp_beside(path)
        except OSError as exc:
            body.close()
            raise StoreError(f"{self._uri(key)}: cannot write {path.parent} ({exc.strerror})") from None
        try:
            digest = hashlib.sha256()
            with f, body:
                while True:
                    with self._translating(key, "GetObject"):
                        chunk = body.read(COPY_CHUNK_SIZE)
                    if not chunk:
                        break
                    digest.update(chunk)
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise StoreError(f"{self._uri(key)}: cannot write {path} ({exc.strerror})") from None
                f.flush()
                os.fsync(f.fileno())
            actual = digest.hexdigest()
            verify(self._uri(key), expected, actual)
            os.replace(tmp, path)
            fsync_dir(path.parent)  # callers commit on it (a model.json written beside these weights)
        finally:
            tmp.unlink(missing_ok=True)
        return actual

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def recorded_sha256(self, key: str) -> tuple[int, str | None] | None:
        head = self._head(key)
        if head is None:
            return None
        return int(head["ContentLength"]), head.get("Metadata", {}).get(SHA256_METADATA)

    def etag(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else quoted_etag(head["ETag"])

    def _listing(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        validate_prefix(prefix)
        root = self._root_prefix()
        client = self._client()
        with self._translating(operation="ListObjectsV2"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    # Folder markers ("x/") and names other tools wrote outside the key alphabet are
                    # skipped: every key a listing returns must be usable with the other methods.
                    if is_valid_key(key):
                        yield key, obj

    def list(self, prefix: str = "") -> list[str]:
        return sorted(key for key, _ in self._listing(prefix))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        found = [ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())
                 for key, obj in self._listing(prefix)]
        return sorted(found, key=lambda info: info.key)

    # --- deletes --------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        client = self._client()
        with self._translating(key, "DeleteObject"):
            client.delete_object(Bucket=self.bucket, Key=object_key)

    def delete_keys(self, keys: list[str]) -> int:
        client = self._client()
        # One DeleteObject per key, not DeleteObjects: each delete is authorised against the key's own ARN,
        # which is what the operator's policy grants (moto authorises a DeleteObjects batch against the
        # bucket ARN instead); gc removes a handful of objects per version or run.
        for key in keys:
            with self._translating(key, "DeleteObject"):
                client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        return len(keys)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        return self.delete_keys(self.list(prefix))

    def clean_stale_uploads(self, older_than_s: float = 3600, dry_run: bool = False) -> int:
        # An interrupted multipart upload is invisible to GET/LIST but its parts cost storage.
        client = self._client()
        # Initiated is the store's clock: measured against it, never this host's.
        cutoff = dt.datetime.fromtimestamp(self.clock(), dt.UTC) - dt.timedelta(seconds=older_than_s)
        stale: list[tuple[str, str]] = []
        with self._translating(operation="ListMultipartUploads"):
            paginator = client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root_prefix()):
                stale += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", []) if u["Initiated"] < cutoff]
        if not dry_run:
            for object_key, upload_id in stale:
                with self._translating(object_key[len(self._root_prefix()) :] or None, "AbortMultipartUpload"):
                    client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
        return len(stale)

    # --- display and checks -----------------------------------------------------------------------
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
        """Reachable bucket, and conditional writes honoured (unless the user opted out, or these
        credentials may not write the probe: ``conditional_writes_verified`` says which)."""
        self._bucket_seen = False
        self._require_bucket()
        self.conditional_writes_verified = require_conditional_writes(self, self._endpoint())
