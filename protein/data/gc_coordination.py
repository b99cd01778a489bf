"""How `datasets push` and `datasets gc` see each other: push markers and the gc lock.

A push relies on the content objects it finds in its listing of ``datasets/objects/`` and does not
upload them again; gc deletes content objects no manifest names. Without coordination a gc could
delete an old orphan a push found, between gc's last manifest listing and the push's manifest.

- A push writes ``datasets/pushes/<random>.json`` (create-only; host, pid, start time) *before* it
  lists anything, then reads ``datasets/gc.lock``; it deletes its marker once its manifest is written
  (in a ``finally``, so also when it fails).
- A gc writes ``datasets/gc.lock`` (create-only; host, pid, start time) *before* it lists the push
  markers; it deletes nothing while a live marker exists, and removes the lock when done.

Why one of them always sees the other: S3 (and a local folder) is strongly consistent, so each write
is visible to every request that starts after it returned. Say the push wrote its marker at time m
and read the lock at r > m; gc wrote its lock at g and listed the markers at l > g. If the push did
not see the lock, r < g; then m < r < g < l, so gc's listing shows the marker and gc deletes nothing.
If gc's listing did not show the marker, l < m, so g < l < m < r and the push sees the lock. A push
that sees a lock waits (polling, at most `CoordinationTimes.push_wait_s`) for it to go, then lists
the objects afresh: what gc deleted meanwhile is uploaded again. Waiting rather than refusing at once
because pushes come from automation at any hour and a gc takes minutes; past the wait the push is
refused (`StoreBusy`, exit 9) rather than hanging a publisher for good.

Records left by killed processes expire, judged on the store's clock (two LastModified times, never
a host clock against the server's):

- A marker is stale once it is `marker_stale_s` (24 h) older than the gc lock being held; gc reports
  and deletes stale markers. A push whose own marker gets close to that age (`margin_s`), or is gone
  (a gc judged it stale while this host's clock did not see the time pass), writes a new one, checks
  the lock again and re-lists before its manifest, so a slow push is never unguarded.
- A lock is abandoned once it is `lock_abandoned_s` (1 h) old. A gc stops deleting (`StoreBusy`) when
  it has held the lock that long less `margin_s` by its own clock (`held_clock`), checked before each
  delete, and checks before each batch of deletes that the lock is still its own (etag) and younger
  than that on the store's clock (a paused VM's clocks stand still), so a push
  that treats an old lock as abandoned never races a live gc: one delete request (bounded by the S3
  client's timeouts and retries, minutes) fits in the margin. A second gc takes an abandoned lock
  over by a compare-and-swap on its etag (`If-Match`): of two gcs doing so at once, one wins; it
  judges the lock's age by the store's clock (`Store.clock`) against the LastModified time, so no
  host's clock enters.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from types import TracebackType

from protein.data.manifest import DATASETS_PREFIX
from protein.errors import NotFound, PreconditionFailed, RecordError, StoreBusy, StoreError
from protein.storage import ObjectInfo, Store
from protein.storage.records import RecordSchema, load_record

log = logging.getLogger(__name__)

# The suspend-counting clock where the platform has one.
BOOT_CLOCK: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def held_clock() -> float:
    """Seconds on a clock that goes on while the host is suspended (Linux CLOCK_BOOTTIME; the monotonic
    clock elsewhere): a gc or push on a laptop closed for the weekend, or a VM suspended, must see on
    waking that its lock or marker has aged, as the store's clock says. time.monotonic stands still
    during a suspend on Linux."""
    return time.clock_gettime(BOOT_CLOCK) if BOOT_CLOCK is not None else time.monotonic()

PUSHES_PREFIX = f"{DATASETS_PREFIX}/pushes/"
GC_LOCK_KEY = f"{DATASETS_PREFIX}/gc.lock"
HOLDER = RecordSchema("datasets gc lock or push marker", required={"host": str, "pid": int, "started": str},
                      optional={"id": str}, max_bytes=4096)


@dataclass(frozen=True)
class CoordinationTimes:
    """The bounds both sides rely on. Push and gc must use the same ones; the defaults are the
    documented ones, tests shrink them."""

    marker_stale_s: float = 24 * 3600  # a push marker older than this (vs the gc lock) is left by a dead push
    lock_abandoned_s: float = 3600  # a gc lock older than this is left by a dead gc
    margin_s: float = 600  # how long before those bounds a live holder renews (push) or stops (gc)
    push_wait_s: float = 900  # how long a push waits for a gc to end before it is refused
    poll_s: float = 5.0  # how often a waiting push looks at the lock again


DEFAULT_TIMES = CoordinationTimes()


def _holder_doc(record_id: str) -> bytes:
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    doc = {"id": record_id, "host": socket.gethostname() or "unknown-host", "pid": os.getpid(), "started": started}
    return json.dumps(doc, sort_keys=True).encode()


def _put_holder(store: Store, key: str, body: bytes, if_match: str | None = None) -> str:
    """Write a lock or marker conditionally (create-only, or over ``if_match``); its etag. A write
    that landed but whose answer was lost is retried by the client, and the retry meets the write
    itself (412): recognised as ours by the id in the body, it holds. It was refused, and left a
    marker that blocked every gc for a day, or a lock that refused every push for an hour."""
    try:
        if if_match is None:
            return store.put_bytes(key, body, if_none_match=True, content_type="application/json")
        return store.put_bytes(key, body, if_match=if_match, content_type="application/json")
    except PreconditionFailed:
        etag = store.etag(key)  # before the bytes: a write after it makes our later checks fail safe
        try:
            found = load_record(store, key, HOLDER)
        except (NotFound, RecordError):
            found = {}
        if etag is not None and found.get("id") == json.loads(body)["id"]:
            return etag
        raise


def describe_holder(store: Store, key: str) -> str:
    """"host h pid p since t" from a lock or marker, or what is known when it cannot be read."""
    try:
        doc = load_record(store, key, HOLDER)
    except NotFound:
        return "released just now"
    except RecordError:
        return "holder unreadable"
    return f"host {doc['host']} pid {doc['pid']} since {doc['started']}"


def _info(store: Store, key: str) -> ObjectInfo | None:
    """One object's listing entry (its LastModified is the store's clock); None if missing."""
    return next((info for info in store.list_info(key) if info.key == key), None)


def _where(store: Store, key: str) -> str:
    return f"{store.uri.rstrip('/')}/{key}"


class PushMarker:
    """``with PushMarker(store, times):`` around everything a push lists, uploads and writes."""

    def __init__(self, store: Store, times: CoordinationTimes = DEFAULT_TIMES) -> None:
        self.store = store
        self.times = times
        self.key = ""
        self._written_at = 0.0  # held_clock, taken before the marker's PUT (so its age is never underestimated)

    def __enter__(self) -> PushMarker:
        self._write()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._remove(self.key)

    def _write(self) -> None:
        marker_id = uuid.uuid4().hex
        key = f"{PUSHES_PREFIX}{marker_id}.json"
        self._written_at = held_clock()
        _put_holder(self.store, key, _holder_doc(marker_id))
        self.key = key
        try:
            self._wait_out_gc()
        except BaseException:
            self._remove(key)
            raise

    def _remove(self, key: str) -> None:
        if not key:
            return
        try:
            self.store.delete(key)
        except StoreError as exc:
            # The push itself is done (or already failing): gc treats the marker as live until it is stale.
            log.warning("could not remove the push marker %s (%s); datasets gc defers to it for %g h",
                        _where(self.store, key), exc, self.times.marker_stale_s / 3600)

    def fresh(self) -> bool:
        """Whether gc still counts this marker as live (with the margin for one more write), and it is
        still there: a gc that judged it stale (the push stalled past the bound where this host's clock
        did not see it, a VM paused) removed it, and may have deleted objects the push listed."""
        if held_clock() - self._written_at >= self.times.marker_stale_s - self.times.margin_s:
            return False
        return self.store.exists(self.key)

    def renew(self) -> None:
        """A new marker (and a new look at the gc lock) for a push that ran close to the stale bound."""
        old = self.key
        try:
            self._write()
        finally:  # refused or not, the old marker goes: the push no longer relies on what it protected
            self._remove(old)
        log.info("push ran for %g h: renewed its marker (%s)", self.times.marker_stale_s / 3600, self.key)

    def _wait_out_gc(self) -> None:
        mine = _info(self.store, self.key)
        listed_at = held_clock()  # the marker's LastModified is at or before the store's clock now
        waited_from = listed_at
        announced = False
        while (lock := _info(self.store, GC_LOCK_KEY)) is not None:
            # The lock's age on the store's clock: our marker's LastModified minus the lock's, plus the
            # time since we listed the marker (never more than the true age).
            base = mine.modified if mine is not None else lock.modified
            age = base - lock.modified + (held_clock() - listed_at)
            where = _where(self.store, GC_LOCK_KEY)
            if age >= self.times.lock_abandoned_s:
                log.warning("%s is %.0f s old (%s): abandoned by a gc that died; pushing anyway", where, age,
                            describe_holder(self.store, GC_LOCK_KEY))
                return
            waited = held_clock() - waited_from
            if waited >= self.times.push_wait_s:
                raise StoreBusy(f"a datasets gc holds {where} ({describe_holder(self.store, GC_LOCK_KEY)}); "
                                f"waited {waited:.0f} s; push again when it ends")
            if not announced:
                log.info("a datasets gc holds %s (%s); waiting up to %.0f s for it to end", where,
                         describe_holder(self.store, GC_LOCK_KEY), self.times.push_wait_s)
                announced = True
            time.sleep(self.times.poll_s)


@dataclass(frozen=True)
class PushMarkers:
    live: list[str]
    stale: list[str]


class GcLock:
    """``datasets/gc.lock`` held by this gc: `acquire`, `push_markers`, `check_held`, `release`."""

    def __init__(self, store: Store, etag: str, acquired_at: float, lock_modified: float,
                 times: CoordinationTimes) -> None:
        self.store = store
        self.etag = etag
        self.times = times
        self._acquired_at = acquired_at  # held_clock, before the lock's PUT
        self._lock_modified = lock_modified  # the lock's LastModified: the store's clock when we took it

    @classmethod
    def acquire(cls, store: Store, times: CoordinationTimes = DEFAULT_TIMES) -> GcLock:
        """Take the lock, or take over an abandoned one; `StoreBusy` naming the holder otherwise."""
        where = _where(store, GC_LOCK_KEY)
        body = _holder_doc(uuid.uuid4().hex)
        started = held_clock()
        try:
            etag = _put_holder(store, GC_LOCK_KEY, body)
        except PreconditionFailed:
            etag = cls._take_over(store, body, times)
        info = _info(store, GC_LOCK_KEY)
        if info is None:  # removed by a gc that thought it still held it: ours no longer protects anything
            raise StoreBusy(f"{where}: removed just after this gc took it; run gc again")
        return cls(store, etag, started, info.modified, times)

    @staticmethod
    def _take_over(store: Store, body: bytes, times: CoordinationTimes) -> str:
        where = _where(store, GC_LOCK_KEY)
        etag = store.etag(GC_LOCK_KEY)
        info = _info(store, GC_LOCK_KEY)
        holder = describe_holder(store, GC_LOCK_KEY)
        if etag is None or info is None:  # released between our PUT and now: try once more, create-only
            try:
                return _put_holder(store, GC_LOCK_KEY, body)
            except PreconditionFailed:
                raise StoreBusy(f"another datasets gc took {where} just now; run gc again when it ends") from None
        age = store.clock() - info.modified  # both the store's clock
        if age < times.lock_abandoned_s:
            raise StoreBusy(f"another datasets gc holds {where} ({holder}); run gc again when it ends (a lock "
                            f"older than {times.lock_abandoned_s / 3600:g} h counts as abandoned)")
        try:
            new_etag = _put_holder(store, GC_LOCK_KEY, body, if_match=etag)
        except PreconditionFailed:
            raise StoreBusy(f"another datasets gc took over the abandoned {where} first; run gc again when it "
                            "ends") from None
        log.warning("%s was %.0f s old (%s): abandoned by a gc that died; taken over", where, age, holder)
        return new_etag

    def push_markers(self) -> PushMarkers:
        """Push markers, live or stale by their age against this lock (both LastModified times)."""
        live: list[str] = []
        stale: list[str] = []
        for info in self.store.list_info(PUSHES_PREFIX):
            old = self._lock_modified - info.modified >= self.times.marker_stale_s
            (stale if old else live).append(info.key)
        return PushMarkers(live, stale)

    def check_held(self) -> None:
        """`StoreBusy` unless this gc may still delete: the lock still its own, and within its bound by
        this host's clock and by the store's (a VM paused by its hypervisor does not count the pause on
        any clock of its own, but the lock's age on the store's clock, the one pushes judge it by, does)."""
        where = _where(self.store, GC_LOCK_KEY)
        if self.store.etag(GC_LOCK_KEY) != self.etag:
            raise StoreBusy(f"{where} is no longer this gc's (taken over by another gc); stopped deleting, run gc "
                            "again when that one ends")
        self.check_within_bound()
        age = self.store.clock() - self._lock_modified
        if age >= self.times.lock_abandoned_s - self.times.margin_s:
            raise StoreBusy(f"{where} is {age:.0f} s old on the store's clock, close to the "
                            f"{self.times.lock_abandoned_s:.0f} s after which pushes treat it as abandoned (this gc "
                            "was paused?); stopped deleting, run gc again")

    def check_within_bound(self) -> None:
        """`StoreBusy` once this gc has held the lock close to the age at which pushes treat it as
        abandoned (no request: cheap enough before every delete)."""
        held = held_clock() - self._acquired_at
        if held >= self.times.lock_abandoned_s - self.times.margin_s:
            raise StoreBusy(f"this gc has held {_where(self.store, GC_LOCK_KEY)} for {held:.0f} s, close to the "
                            f"{self.times.lock_abandoned_s:.0f} s after which pushes treat it as abandoned; stopped "
                            "deleting, run gc again")

    def release(self) -> None:
        # Only our own lock: a gc that took it over holds it now. (The read and the delete are two
        # requests; a takeover between them needs our lock to be past its bound, which check_held refuses.)
        try:
            if self.store.etag(GC_LOCK_KEY) == self.etag:
                self.store.delete(GC_LOCK_KEY)
        except StoreError as exc:
            log.warning("could not remove %s (%s); it counts as abandoned after %g h",
                        _where(self.store, GC_LOCK_KEY), exc, self.times.lock_abandoned_s / 3600)


def holders(store: Store, keys: list[str], limit: int = 3) -> str:
    """The first few markers by key and holder, for a one-line message."""
    shown = [f"{_where(store, key)} ({describe_holder(store, key)})" for key in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more
