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


def forget_clients() -> None:
    """Drop every cached client (the next store to open makes a new one)."""
    with _lock:
        _clients.clear()
