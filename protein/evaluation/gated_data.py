"""Which data a gate has already judged, with which training config.

A scheduled or push-triggered run skips data the champion was trained on; without this record it
retrained, every night, data whose challenger the gate had refused (the champion keeps its older
data, so the fingerprints differ): GPU hours each night for the same answer, and a marginal dataset
that loses the gate would in time win it by chance, one more draw a night. The gate writes one
small record per (data fingerprint, training config) under gates/by-data/ (the orchestrator's
prefix: a training host cannot write it); a run with skip_if_unchanged reads that one key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from protein.config import TrainConfig, to_dict
from protein.data.fingerprint import FINGERPRINT_CHARS
from protein.data.manifest import FINGERPRINT
from protein.errors import NotFound, PreconditionFailed
from protein.storage import Store, open_store

# Where a run trained, not what it produces: a config that differs only here is the same training.
MACHINE_FIELDS = frozenset({"device"})


def config_digest(train_config: dict[str, Any]) -> str:
    """16 hex of SHA-256 over the training config, machine fields left out, keys sorted."""
    produced = {k: v for k, v in train_config.items() if k not in MACHINE_FIELDS}
    return hashlib.sha256(json.dumps(produced, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gated_key(data_fingerprint: str, digest: str) -> str:
    if not FINGERPRINT.fullmatch(data_fingerprint):
        raise ValueError(f"a data fingerprint is {FINGERPRINT_CHARS} lowercase hex digits, got {data_fingerprint!r}")
    return f"gates/by-data/{data_fingerprint}/{digest}.json"


def gated_key_of(spec: dict[str, Any]) -> str | None:
    """The judgement's key for a version trained on spec's data with spec's config; None for a version
    whose model.json does not say what it trained on."""
    fingerprint, train_config = spec.get("data_fingerprint"), spec.get("train_config")
    if not isinstance(fingerprint, str) or not isinstance(train_config, dict):
        return None
    return gated_key(fingerprint, config_digest(train_config))


def record_gated_data(store: Store, challenger_id: str, spec: dict[str, Any], decision: dict[str, Any]) -> str | None:
    """Note that the gate judged a challenger trained on spec's data with spec's config (the newest
    judgement wins); None for a version whose model.json does not say what it trained on."""
    key = gated_key_of(spec)
    if key is None:
        return None
    # Where this data stood in push order when it was judged (the gate's data-order rule read it:
    # its newest push on the run's channel, None when never pushed there): a later push of the same
    # data is new input (covers()).
    order = decision.get("data_order") or {}
    doc = {"challenger": challenger_id, "promoted": bool(decision.get("promote")),
           "reasons": list(decision.get("reasons") or []), "decided": dt.datetime.now(dt.UTC).isoformat(),
           "channel": order.get("channel"), "sequence": order.get("challenger_sequence")}
    store.put_bytes(key, json.dumps(doc, indent=2).encode())
    return key


def withdraw_gated_data(store: Store, challenger_id: str, spec: dict[str, Any], why: str) -> bool:
    """A passed gate whose promotion did not land: its judgement of spec's data and config no longer
    says "promoted" while it still names this challenger (gated_before then finds none). The record
    is replaced, conditional on the etag read before its bytes, never deleted: a judgement another run
    writes meanwhile (the same data and config, gated again) stands. True when withdrawn."""
    key = gated_key_of(spec)
    if key is None or (etag := store.etag(key)) is None:
        return False
    try:
        judged = json.loads(store.get_bytes(key))
    except NotFound:
        return False
    except ValueError:
        judged = None
    if not (isinstance(judged, dict) and judged.get("challenger") == challenger_id):
        return False
    doc = {"withdrawn": challenger_id, "why": why, "at": dt.datetime.now(dt.UTC).isoformat()}
    try:
        store.put_bytes(key, json.dumps(doc, indent=2).encode(), if_match=etag)
    except PreconditionFailed:
        return False
    return True


def gated_before(store_uri: str, data_fingerprint: str, config: TrainConfig) -> dict[str, Any] | None:
    """The gate's last judgement of a challenger trained on this data with this config, or None. A
    pass stands only once its promotion landed (the challenger is in the champion's history, served
    or rolled back since): the gate records it before the promotion, and a run that died between the
    two (a killed host, a tombstoned challenger, a store that stayed down) would otherwise have its
    data skipped as "promoted" every night by a challenger that never served."""
    from protein.registry import Registry

    store = open_store(store_uri)
    try:
        doc = json.loads(store.get_bytes(gated_key(data_fingerprint, config_digest(to_dict(config)))))
    except NotFound:
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("challenger"), str)):
        return None
    if doc.get("promoted") and not any(event.get("action") == "promote" and event.get("model_id") == doc["challenger"]
                                       for event in Registry(store).champion().history):
        return None
    return doc


def covers(judged: dict[str, Any], resolved: dict[str, Any]) -> bool:
    """Whether a judgement stands for the push a run resolved: not when the same data was pushed on
    that channel after it was judged (its first push after a manual run judged it, or someone
    brought it back as the newest): train it, and let the gate judge it in today's push order. A
    rollback pushes nothing, so a nightly never re-promotes the data an operator rolled back from."""
    channel, sequence = resolved.get("channel"), resolved.get("sequence")
    if channel is None or channel != judged.get("channel") or not isinstance(sequence, int):
        return True  # a dataset named directly, another channel's order, or a record without one
    judged_sequence = judged.get("sequence")
    return isinstance(judged_sequence, int) and sequence <= judged_sequence
