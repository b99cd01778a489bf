"""Whether an S3 endpoint honours conditional writes, proven by a probe before anything relies on them.

Promotions and create-only registrations are compare-and-swaps on ``If-None-Match: *`` and
``If-Match: <etag>``; an endpoint that ignores either would let two writers overwrite each other.
"""

from __future__ import annotations

import os
import secrets

from protein.errors import PreconditionFailed, RecordError, StoreError, UnsupportedRequest
from protein.storage.base import Store, logger

# An endpoint without conditional writes can still be used when the user says so: `S3Store` then sends
# no condition headers and checks the conditions with a HEAD before each write, so concurrent
# writers (promotions, registrations, checkpoints, channels, gc's lock) are last-writer-wins.
ALLOW_LAST_WRITER_WINS_ENV = "PROTEIN_ALLOW_LAST_WRITER_WINS"
PROBE_PREFIX = "probes"


def last_writer_wins_allowed() -> bool:
    return os.environ.get(ALLOW_LAST_WRITER_WINS_ENV, "").strip().lower() in ("1", "true", "yes")


def require_conditional_writes(store: Store, endpoint: str = "") -> bool:
    """Raise `StoreError` unless ``store`` refuses a second create-only write and a swap on a stale
    etag; True when that was verified, False when it was not checked (the user accepted
    last-writer-wins, or these credentials may not write the probe). ``endpoint`` is the
    " scheme://host:port" text error messages name."""
    if last_writer_wins_allowed():
        logger.warning("%s: conditional writes not checked and not used (%s is set): concurrent writers are "
                       "last-writer-wins", store.uri, ALLOW_LAST_WRITER_WINS_ENV)
        return False
    return _probe(store, endpoint)


def _create_probe(store: Store, probe: str, body: bytes) -> None:
    """Write the probe create-only. A write that landed but whose answer was lost (a read timeout) is
    retried by the client, and the retry meets the write itself (412): recognised by its body, it
    holds. It was refused as "already exists" on a key that was random and new, failing the check
    and leaving the probe behind."""
    try:
        store.put_bytes(probe, body, if_none_match=True)
    except PreconditionFailed:
        try:
            found = store.get_bytes(probe, max_bytes=len(body))
        except (StoreError, RecordError):  # gone, unreadable or larger: not this probe
            found = None
        if found != body:
            raise


def _probe(store: Store, endpoint: str) -> bool:
    # A fresh key per check: two hosts checking at once never see each other's probe.
    token = secrets.token_hex(8)
    probe = f"{PROBE_PREFIX}/conditional-write-{token}"
    body = f"conditional-write probe {token}".encode()
    missing = None
    # "ignores": the write went through; "does not implement": 501 (versitygw, s3gw, AWS If-Match before 2024).
    verb = "ignores"
    try:
        _create_probe(store, probe, body)
    except UnsupportedRequest:
        # The condition, or something else the request carried (botocore's default checksums)? The
        # same write without the condition tells: its own error, if it fails too, names the cause.
        store.put_bytes(probe, body)
        missing, verb = "If-None-Match (create-only writes)", "does not implement"
    except StoreError as exc:
        if " access denied: " not in str(exc):
            raise
        # A read-only caller (a predict role) never writes conditionally: nothing to verify.
        logger.info("conditional writes not checked: this caller may not write %s (%s)", PROBE_PREFIX, exc)
        return False
    try:
        if missing is None:
            try:
                store.put_bytes(probe, body + b" again", if_none_match=True)
                missing = "If-None-Match (create-only writes)"
            except PreconditionFailed:
                pass
        if missing is None:
            try:
                store.put_bytes(probe, b"probe swap", if_match='"00000000000000000000000000000000"')
                missing = "If-Match (compare-and-swap)"
            except PreconditionFailed:
                pass
            except UnsupportedRequest:
                missing, verb = "If-Match (compare-and-swap)", "does not implement"
    finally:
        try:
            store.delete(probe)
        except StoreError as exc:
            # The capability is proven either way; a leftover probe of a few bytes is harmless and
            # `protein models gc` removes old ones.
            logger.warning("could not remove the conditional-write probe: %s", exc)
    if missing is not None:
        raise StoreError(
            f"{store.uri}: the S3 endpoint{endpoint} {verb} {missing} on PutObject; "
            "promotions and registrations need it to never overwrite each other "
            f"(use an endpoint that honours conditional writes, or set {ALLOW_LAST_WRITER_WINS_ENV}=1 "
            "to accept last-writer-wins promotions)"
        )
    return True
