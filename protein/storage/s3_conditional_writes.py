"""Whether an S3 endpoint honours conditional writes, proven by a probe before anything relies on them.

Promotions and create-only registrations are compare-and-swaps on ``If-None-Match: *`` and
``If-Match: <etag>``; an endpoint that ignores either would let two writers overwrite each other.
"""

from __future__ import annotations

import os
import secrets

from protein.errors import PreconditionFailed, StoreError
from protein.storage.base import Store, logger

# An endpoint without conditional writes can still be used when the user says so (then concurrent
# promotions are last-writer-wins).
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
        logger.warning("%s: conditional writes not checked (%s is set): concurrent promotions are "
                       "last-writer-wins", store.uri, ALLOW_LAST_WRITER_WINS_ENV)
        return False
    return _probe(store, endpoint)


def _probe(store: Store, endpoint: str) -> bool:
    # A fresh key per check: two hosts checking at once never see each other's probe.
    probe = f"{PROBE_PREFIX}/conditional-write-{secrets.token_hex(8)}"
    missing = None
    try:
        store.put_bytes(probe, b"probe", if_none_match=True)
    except StoreError as exc:
        if " access denied: " not in str(exc):
            raise
        # A read-only caller (a predict role) never writes conditionally: nothing to verify.
        logger.info("conditional writes not checked: this caller may not write %s (%s)", PROBE_PREFIX, exc)
        return False
    try:
        try:
            store.put_bytes(probe, b"probe again", if_none_match=True)
            missing = "If-None-Match (create-only writes)"
        except PreconditionFailed:
            pass
        if missing is None:
            try:
                store.put_bytes(probe, b"probe swap", if_match='"00000000000000000000000000000000"')
                missing = "If-Match (compare-and-swap)"
            except PreconditionFailed:
                pass
    finally:
        try:
            store.delete(probe)
        except StoreError as exc:
            # The capability is proven either way; a leftover 5-byte probe is harmless and
            # `protein models gc` removes old ones.
            logger.warning("could not remove the conditional-write probe: %s", exc)
    if missing is not None:
        raise StoreError(
            f"{store.uri}: the S3 endpoint{endpoint} ignores {missing} on PutObject; "
            "promotions and registrations need it to never overwrite each other "
            f"(use an endpoint that honours conditional writes, or set {ALLOW_LAST_WRITER_WINS_ENV}=1 "
            "to accept last-writer-wins promotions)"
        )
    return True
