"""A retrain's resolution of its ``data``, kept in the store for the run's retries.

A run resolves a channel once, at its start (protein.data.channels). A retry of the same flow run
(Prefect's retries, Retry in the UI) starts the flow again; resolving again after a push meanwhile
trained the newer data under a new run id from epoch 0, leaving the first attempt's checkpoint
behind, and the push's own run trained it a second time. The first attempt's resolution is kept at
``gates/retrains/<flow run id>/resolved.json`` (create-only; the orchestrator's prefix, which a
training host cannot write), and every later attempt of that run takes it.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

from protein.errors import NotFound, PreconditionFailed
from protein.storage import Store, open_store

RESOLUTION_FORMAT = "protein-run-resolution/1"
RESOLUTIONS_PREFIX = "gates/retrains"


def resolution_key(run_key: str) -> str:
    """The key of a flow run's resolution; run_key must be the run's UUID (it names the key)."""
    try:
        canonical = str(uuid.UUID(run_key))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"a run's resolution is keyed by its flow run id (a UUID), got {run_key!r}") from None
    return f"{RESOLUTIONS_PREFIX}/{canonical}/resolved.json"


def _kept(store: Store, key: str, data: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(store.get_bytes(key))
    except NotFound:
        return None
    if doc.get("format") != RESOLUTION_FORMAT or doc.get("data") != data or not isinstance(doc.get("resolved"), dict):
        return None  # another data parameter (edited before a rerun): resolve it afresh
    return doc["resolved"]


def resolve_once(data: str, store_uri: str, run_key: str,
                 resolve: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(resolution, kept): this run's first resolution of ``data`` when one is kept, else
    ``resolve()``'s, kept when it names a channel push. Only a channel is kept: a dataset named
    directly resolves to itself, and a problem (no push yet) may be mended before the retry."""
    store = open_store(store_uri)
    key = resolution_key(run_key)
    if (kept := _kept(store, key, data)) is not None:
        return kept, True
    resolved = resolve()
    if resolved.get("problem") or not resolved.get("channel"):
        return resolved, False
    doc = {"format": RESOLUTION_FORMAT, "data": data, "resolved": resolved,
           "at": dt.datetime.now(dt.UTC).isoformat()}
    try:
        store.put_bytes(key, json.dumps(doc, indent=2).encode(), if_none_match=True)
    except PreconditionFailed:  # an attempt beside this one kept its resolution first: take that
        if (kept := _kept(store, key, data)) is not None:
            return kept, True
    return resolved, False
