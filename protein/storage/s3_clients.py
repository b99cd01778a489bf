"""One boto3 S3 client per process and configuration, shared by every `S3Store` that opens.

Creating a client costs 0.1-0.3 s of CPU: a new boto3 session loads botocore's endpoint rules and
the S3 service model from JSON each time. A retrain opens the store a dozen times (channel, champion,
registry records, dataset, gate record, submission), and every flow run is a process of its own, so
per store that was most of a quiet nightly's CPU beside the imports. Low-level boto3 clients are
thread-safe; sessions are not, so clients are created under a lock.

What the standard chain reads stays the source of truth: the cache is keyed by the environment it
reads (every AWS_* variable and HOME, where ~/.aws lives) and by the client's own settings, so a
process that changes its credentials or endpoint gets a client for them. Keyed by process too: a
client's pooled connections must never cross a fork (DataLoader workers).
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

_clients: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()
MAX_CLIENTS = 16  # distinct environments in one process: tests switch roles; a worker uses one


def environment_key() -> tuple[tuple[str, str], ...]:
    """What boto3's standard chain reads from the environment (values stay in memory, as boto3 keeps them)."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_") or k == "HOME"))


def shared_client(settings: dict[str, Any]) -> Any:
    """The process's S3 client for these botocore Config settings and the current environment."""
    key = (os.getpid(), tuple(sorted((k, repr(v)) for k, v in settings.items())), environment_key())
    with _lock:
        client = _clients.get(key)
        if client is None:
            import boto3.session
            from botocore.config import Config

            if len(_clients) >= MAX_CLIENTS:  # the oldest first; its stores keep their reference
                _clients.pop(next(iter(_clients)))
            client = _clients[key] = boto3.session.Session().client("s3", config=Config(**settings))
        return client


# botocore's own wording when it refuses an endpoint URL while building a client.
_INVALID_ENDPOINT = "Invalid endpoint: "
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#]*@")


def redacted_uri(uri: str) -> str:
    """``uri`` without what may hold a secret: user:password@ before the host, and the query and
    fragment (a presigned link's X-Amz-Credential, X-Amz-Security-Token and X-Amz-Signature). For a
    URI a user passed where it is refused: the refusal names it, and may reach logs and run states."""
    text = uri.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    hidden = ""
    for mark in "?#":
        if mark in rest:
            rest, hidden = rest.split(mark, 1)[0], f"{mark}(hidden)"
    # Everything up to the last '@': a password may itself hold '@' or '/' (an AWS secret key does).
    if "@" in rest:
        rest = "(hidden)@" + rest.rpartition("@")[2]
    return f"{scheme}://{rest}{hidden}"


def redacted_endpoint(url: str) -> str:
    """``scheme://host:port`` of an endpoint URL: no user:password@, path or query, which may hold secrets.

    Parsed by hand, not with urlsplit: the URL is one botocore refused, so its port may not parse."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        return "(not a URL)"
    # The last '@' ends any userinfo, even a password that itself holds '@' or '/'.
    hostport = rest.rpartition("@")[2]
    for end in "/?#":
        hostport = hostport.split(end, 1)[0]
    return f"{scheme}://{hostport}"


def client_setup_error(exc: ValueError) -> str:
    """What to tell a person when botocore refuses the configuration with a bare ValueError.

    botocore puts the endpoint URL in its message verbatim, credentials included when someone wrote
    them into AWS_ENDPOINT_URL; this names only scheme://host:port."""
    message = str(exc)
    if message.startswith(_INVALID_ENDPOINT):
        endpoint = redacted_endpoint(message[len(_INVALID_ENDPOINT):])
        return f"invalid S3 endpoint URL {endpoint} (check AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or ~/.aws/config)"
    return "invalid S3 client configuration: " + _URL_USERINFO.sub(r"\g<1>", message)


def forget_clients() -> None:
    """Drop every cached client (the next store to open makes a new one)."""
    with _lock:
        _clients.clear()
