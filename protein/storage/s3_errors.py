"""Every botocore/boto3 failure becomes one `StoreError` line: the one place that maps them.

Messages are built from the URI, the S3 action and the error code only, never from the exception
text, the request or the credentials. An AccessDenied names the IAM action that was refused, so an
operator can fix the policy without a debugger.
"""

from __future__ import annotations

from typing import Any

from protein.errors import NotFound, PreconditionFailed, StoreError, UnsupportedRequest

# The IAM action each S3 API operation needs (https://docs.aws.amazon.com/service-authorization/latest/
# reference/list_amazons3.html); HeadObject is authorised by s3:GetObject, HeadBucket by s3:ListBucket.
IAM_ACTIONS = {
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "CopyObject": "s3:PutObject",
}
# The signature or the key itself was refused: a credentials problem, not a missing permission.
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
    }
)
PERMISSION_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403"})
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# botocore >= 1.36 sends uploads aws-chunked with a trailing CRC32 unless told otherwise; GCS's S3 API
# and other S3-compatible stores refuse such a body with one of these codes.
CHECKSUM_REFUSAL_CODES = frozenset({"InvalidArgument", "NotImplemented"})
UPLOAD_OPERATIONS = frozenset({"PutObject", "UploadPart"})
CHECKSUM_HINT = ("; if the endpoint does not accept botocore's default upload checksums, set "
                 "AWS_REQUEST_CHECKSUM_CALCULATION=when_required and AWS_RESPONSE_CHECKSUM_VALIDATION=when_required")


def error_code(exc: Any) -> tuple[str, int | None]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def iam_action(operation: str | None) -> str:
    if not operation:
        return "an S3 action"
    return IAM_ACTIONS.get(operation, f"s3:{operation}")


def access_denied(uri: str, operation: str | None) -> StoreError:
    """The caller is known but not allowed: name the refused action (IAM policies are per action)."""
    return StoreError(
        f"{uri}: access denied: {iam_action(operation)} was refused; "
        "the caller's credentials lack this permission (check the IAM policy of the role or user)"
    )


def is_boto_error(exc: BaseException) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError | Boto3Error)


def translate(
    exc: BaseException, uri: str, endpoint: str = "", store_uri: str = "", bucket: str = "",
    operation: str | None = None,
) -> StoreError:
    """One-line StoreError for a boto error on ``uri`` (an object in the store ``store_uri``).
    ``endpoint`` is " scheme://host:port" or ""."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore import exceptions as bce

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        exc = exc.__context__  # boto3 re-raises the real ClientError as a plain-text wrapper
    if isinstance(exc, RetriesExceededError) and isinstance(exc.last_exception, Exception):
        exc = exc.last_exception
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return StoreError(f"{uri}: no AWS credentials found in the standard chain")
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError | bce.ConnectionClosedError):
        return StoreError(f"{uri}: cannot reach the S3 endpoint{endpoint}")
    if isinstance(exc, bce.ReadTimeoutError):
        return StoreError(f"{uri}: the S3 endpoint{endpoint} did not answer in time")
    if isinstance(exc, bce.IncompleteReadError | bce.ResponseStreamingError):
        return StoreError(f"{uri}: the S3 endpoint{endpoint} broke off the transfer")
    if isinstance(exc, bce.ProfileNotFound | bce.NoRegionError):
        return StoreError(f"{uri}: {exc}")
    if isinstance(exc, bce.ClientError):
        code, status = error_code(exc)
        operation = operation or getattr(exc, "operation_name", None)
        if code == "NoSuchBucket":
            return StoreError(f"{store_uri or uri}: bucket '{bucket}' does not exist")
        if code in NOT_FOUND_CODES:
            return NotFound(f"{uri}: not found")
        if code in CREDENTIAL_CODES:
            return StoreError(
                f"{uri}: S3 rejected the credentials ({code}) on {iam_action(operation)}; "
                "check the access key, secret and session token in the standard chain"
            )
        if code in PERMISSION_CODES or status == 403:
            return access_denied(uri, operation)
        if code in PRECONDITION_CODES or status == 412:
            return PreconditionFailed(f"{uri}: precondition failed (changed concurrently)")
        failed = f"{uri}: S3 request {operation or ''} failed ({code or status})".replace("  ", " ")
        if operation in UPLOAD_OPERATIONS and (code in CHECKSUM_REFUSAL_CODES or status == 501):
            failed += CHECKSUM_HINT
        if code == "NotImplemented" or status == 501:
            return UnsupportedRequest(failed)
        return StoreError(failed)
    if isinstance(exc, bce.BotoCoreError):
        return StoreError(f"{uri}: S3 client error ({type(exc).__name__})")
    return StoreError(f"{uri}: {type(exc).__name__}")
