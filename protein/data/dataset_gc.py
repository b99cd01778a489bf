"""`protein datasets gc`: remove content objects that no dataset manifest names.

Every complete dataset (a manifest under ``datasets/<fingerprint>/``) is kept, and so is every object
any format-2 manifest names. An object no manifest names is an orphan: left by a push that died before
its manifest, or by a dataset someone removed (by deleting its manifest). It is deleted only once it is
older than the age guard, because a push in flight uploads its objects before its manifest: for that
push every object is an orphan until its last write.

A push also relies on objects it found already stored (it does not upload them again), old orphans
included, so gc and push exclude each other (protein.data.gc_coordination): gc takes
``datasets/gc.lock`` and then deletes nothing while any push marker under ``datasets/pushes/`` is
live; a push writes its marker and then waits out a held lock. Each writes its own record before
reading the other's, so at least one of them sees the other. `collect_orphans` is that protocol around
`plan_objects_gc` and `apply_objects_gc`.

Defence in depth, kept: the age guard, and the manifests listed again just before deleting (anything a
manifest written meanwhile names is kept; only those are parsed, since a manifest is never rewritten:
a store of a year of daily pushes pays each manifest's parse once a gc, not twice). A manifest that
cannot be read stops gc before anything is deleted: what it names is unknown (so does a store
folder that cannot be listed: the store raises, never lists it as empty). Should an object a
dataset names go missing anyway (deleted by hand), reading that dataset fails in one line naming the
file and the object, and pushing the same data again re-uploads what is missing (`push_dataset`
repairs a complete dataset's objects).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from protein.data.gc_coordination import DEFAULT_TIMES, PUSHES_PREFIX, CoordinationTimes, GcLock, holders
from protein.data.manifest import (
    DATASET_MANIFEST,
    DATASETS_PREFIX,
    MANIFEST_KEY,
    OBJECTS_PREFIX,
    digest_of_object_key,
    parse_manifest,
)
from protein.errors import DataError, NotFound, RecordError, StoreBusy
from protein.storage import Store
from protein.storage.records import load_record

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_S = 24 * 3600
# Deletes between two checks that this gc still holds its lock (one HEAD each).
DELETE_BATCH = 100


@dataclass(frozen=True)
class ObjectsGcPlan:
    # The manifests read for the plan (one per complete dataset). A manifest is written once (create-only,
    # its key its content's fingerprint), so the re-read before deleting parses only those written since.
    manifests: frozenset[str]
    named: int  # distinct content objects those manifests name
    orphans: list[str] = field(default_factory=list)  # keys to delete
    young: list[str] = field(default_factory=list)  # orphans the age guard keeps
    orphan_bytes: int = 0

    @property
    def datasets(self) -> int:
        """How many complete datasets' manifests were read."""
        return len(self.manifests)

    def to_dict(self) -> dict[str, object]:
        return {"datasets": self.datasets, "named_objects": self.named, "orphans": len(self.orphans),
                "orphan_bytes": self.orphan_bytes, "kept_young_orphans": len(self.young)}


def named_objects(store: Store, known: frozenset[str] = frozenset()) -> tuple[set[str], set[str]]:
    """(the manifests read, the SHA-256 of every object a format-2 manifest among them names); the
    manifests in ``known`` are left out (read before: what they name cannot have changed)."""
    named: set[str] = set()
    read: set[str] = set()
    for key in store.list(f"{DATASETS_PREFIX}/"):
        match = MANIFEST_KEY.match(key)
        if match is None or key in known:
            continue
        where = f"{store.uri.rstrip('/')}/{key}"
        try:
            manifest = parse_manifest(load_record(store, key, DATASET_MANIFEST), where, match.group(1))
        except NotFound:  # removed since the listing: it names nothing any more
            continue
        except (RecordError, DataError) as exc:
            raise RecordError(f"{exc}; gc deletes nothing while a dataset manifest cannot be read "
                              "(fix or delete that manifest first)") from None
        read.add(key)
        if manifest.content_addressed:
            named.update(entry.sha256 for entry in manifest.files.values())
    return read, named


def check_age_guard(min_age_s: float) -> None:
    if not min_age_s >= 0:  # NaN too: every comparison with it is false, so every orphan would look old
        raise DataError(f"the gc age guard must be >= 0 hours, got {min_age_s / 3600:g}")


def plan_objects_gc(store: Store, min_age_s: float = DEFAULT_MIN_AGE_S, now: float | None = None) -> ObjectsGcPlan:
    """What gc would delete. Objects are listed after the manifests, so an object a push uploads after the
    manifest listing is younger than the guard. Ages are on the store's clock (``now``: the store's
    time, read from it when not given), never this host's: a host running fast would see a push's
    fresh objects as old."""
    check_age_guard(min_age_s)
    manifests, named = named_objects(store)
    cutoff = (store.clock() if now is None else now) - min_age_s
    orphans: list[str] = []
    young: list[str] = []
    orphan_bytes = 0
    for info in store.list_info(f"{OBJECTS_PREFIX}/"):
        digest = digest_of_object_key(info.key)
        if digest is None or digest in named:  # not one of ours, or in use
            continue
        if info.modified >= cutoff:
            young.append(info.key)
        else:
            orphans.append(info.key)
            orphan_bytes += info.size
    return ObjectsGcPlan(frozenset(manifests), len(named), orphans, young, orphan_bytes)


def apply_objects_gc(store: Store, plan: ObjectsGcPlan, lock: GcLock | None = None) -> int:
    """Delete the plan's orphans, except any a manifest written since the plan names; returns how many.
    With ``lock``, checks before each batch that this gc still holds it and before each delete that it
    is within its bound (`StoreBusy` if not)."""
    # Only manifests written since the plan can name a planned orphan (it named none of the others).
    _, named_now = named_objects(store, known=plan.manifests)
    doomed = [key for key in plan.orphans if digest_of_object_key(key) not in named_now]
    if len(doomed) < len(plan.orphans):
        log.info("%d orphans are named by a manifest written since the plan; kept", len(plan.orphans) - len(doomed))
    for start in range(0, len(doomed), DELETE_BATCH):
        if lock is None:
            store.delete_keys(doomed[start:start + DELETE_BATCH])
            continue
        lock.check_held()
        for key in doomed[start:start + DELETE_BATCH]:
            # Before each delete: one slow batch (a hundred requests, each with the S3 client's
            # timeouts and retries) could otherwise run past the age at which a push takes the lock
            # for abandoned and relies on the objects it lists.
            lock.check_within_bound()
            store.delete_keys([key])
    log.info("deleted %d orphaned content objects from %s", len(doomed), store.uri)
    return len(doomed)


def collect_orphans(store: Store, min_age_s: float = DEFAULT_MIN_AGE_S, *, dry_run: bool = False,
                    times: CoordinationTimes = DEFAULT_TIMES) -> dict[str, object]:
    """What `protein datasets gc` prints. Under the gc lock: removes stale push markers, then deletes
    orphans unless a push is live (`StoreBusy`, exit 9, nothing deleted). A dry run takes no lock and
    writes nothing; it counts the push markers it sees."""
    check_age_guard(min_age_s)  # before the lock: a bad argument takes nothing
    if dry_run:
        plan = plan_objects_gc(store, min_age_s)
        return {**plan.to_dict(), "deleted": 0, "push_markers": len(store.list(PUSHES_PREFIX)),
                "stale_push_markers_removed": 0}
    lock = GcLock.acquire(store, times)
    try:
        markers = lock.push_markers()
        if markers.stale:
            log.warning("removing %d stale push marker(s), left by pushes that died: %s", len(markers.stale),
                        holders(store, markers.stale))
            store.delete_keys(markers.stale)
        if markers.live:
            raise StoreBusy(f"deleted no content object: {len(markers.live)} push(es) in progress: "
                            f"{holders(store, markers.live)}; run gc again when they end")
        plan = plan_objects_gc(store, min_age_s)
        deleted = apply_objects_gc(store, plan, lock)
    finally:
        lock.release()
    return {**plan.to_dict(), "deleted": deleted, "push_markers": 0, "stale_push_markers_removed": len(markers.stale)}
