"""A training run's checkpoint in the store, written by one attempt at a time.

`runs/<run_id>/checkpoint.pt` is rewritten whole after every epoch, and a run killed or given up
on resumes from it under the same run id. A host the dispatcher gave up on may in fact be alive (a
network partition, a worker whose heartbeats stopped but whose training did not): it and the
re-dispatched attempt would then both write the same key, each from its own line of epochs, and
the run could finish on weights from one line with a history from the other.

Each write is therefore conditional on the object the writer last read or wrote (its etag; "must
not exist" when it started from nothing). The first attempt to write after another attempt has
written loses with `CheckpointSuperseded` and stops: one line of training per run, whichever
attempt wrote first. A conditional write whose answer was lost and retried by the client finds
its own bytes in the store (the same SHA-256), which is not a loss.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from protein.errors import CheckpointSuperseded, PreconditionFailed, StoreError
from protein.storage import Store
from protein.storage.records import record_location

CHECKPOINT_FORMAT = "protein-train-checkpoint/1"


def checkpoint_key(run_id: str) -> str:
    return f"runs/{run_id}/checkpoint.pt"


def metrics_key(run_id: str) -> str:
    return f"runs/{run_id}/metrics.jsonl"


def save_checkpoint(store: Store, run_id: str, state: dict[str, Any], *, expected_etag: str | None = None) -> str:
    """Write the run's checkpoint whole and return its etag: only if the stored checkpoint is still
    ``expected_etag``, or, with None (an attempt that started from nothing), only if there is none.
    Either condition lost to another writer raises `CheckpointSuperseded`; the stored checkpoint
    is left as that writer made it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    key = checkpoint_key(run_id)
    # One object, written whole: a crash mid-upload leaves the previous epoch's checkpoint.
    try:
        if expected_etag is not None:
            return store.put_bytes(key, data, if_match=expected_etag)
        return store.put_bytes(key, data, if_none_match=True)
    except PreconditionFailed:
        # Our own write, if the stored bytes are ours: the store took it, its answer was lost, and
        # the client's retry of the same conditional write lost to it. The etag is read on both sides
        # of the checksum: one that another attempt wrote in between is never taken for ours.
        before = store.etag(key)
        recorded = store.recorded_sha256(key)
        if (before is not None and recorded is not None and recorded[1] == hashlib.sha256(data).hexdigest()
                and store.etag(key) == before):
            return before
        where = record_location(store, key)
        if before is None:
            raise CheckpointSuperseded(f"{where}: deleted after this attempt last wrote it; this attempt stops "
                                       f"(run {run_id} has no checkpoint to continue from)") from None
        raise superseded(where, run_id, "started" if expected_etag is None else "last wrote it") from None


def superseded(where: str, run_id: str, since: str) -> CheckpointSuperseded:
    return CheckpointSuperseded(
        f"{where}: another attempt of run {run_id} wrote the checkpoint after this attempt {since}; this attempt "
        "stops so the run keeps one line of training (the other attempt carries on; a later retry resumes from "
        "its checkpoint)")


def check_still_ours(store: Store, run_id: str, etag: str) -> None:
    """`CheckpointSuperseded` unless the run's checkpoint is still the one this attempt wrote (etag):
    for what an attempt writes beside its checkpoint (metrics.jsonl), so that an attempt that lost
    the checkpoint never rewrites the winner's history."""
    if store.etag(checkpoint_key(run_id)) != etag:
        raise superseded(record_location(store, checkpoint_key(run_id)), run_id, "last wrote it")


def load_checkpoint(store: Store, run_id: str) -> dict[str, Any] | None:
    """The run's checkpoint, or None when it has none."""
    return read_checkpoint(store, run_id)[0]


def read_checkpoint(store: Store, run_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """The run's checkpoint and the etag to write the next one against (None, None when it has
    none). The etag is read before the bytes: a checkpoint written between the two reads makes the
    next write lose, never win against a checkpoint this attempt did not see."""
    key = checkpoint_key(run_id)
    etag = store.etag(key)
    if etag is None:
        return None, None
    # weights_only: a checkpoint is data; never run code found in a store.
    try:
        state = torch.load(io.BytesIO(store.get_bytes(key)), map_location="cpu", weights_only=True)
    except Exception as exc:  # untrusted bytes: whatever the safe unpickler trips on (IndexError too)
        # The unpickler's message is a page of advice that suggests weights_only=False: not for users.
        raise StoreError(
            f"{record_location(store, key)}: not a loadable training checkpoint ({type(exc).__name__}); nothing in it "
            "was executed; delete it or start a new --run-id"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{record_location(store, key)}: not a protein training checkpoint")
    return state, etag
