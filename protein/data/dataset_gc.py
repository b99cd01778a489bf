"""`protein datasets gc`: remove content objects that no dataset manifest names.

Every complete dataset (a manifest under ``datasets/<fingerprint>/``) is kept, and so is every object
any format-2 manifest names. An object no manifest names is an orphan: left by a push that died before
its manifest, or by a dataset someone removed (by deleting its manifest). It is deleted only once it is
older than the age guard, because a push in flight uploads its objects before its manifest: for that
push every object is an orphan until its last write.

A manifest that cannot be read stops gc before anything is deleted: what it names is unknown. The
manifests are listed again just before deleting, and anything a manifest written meanwhile names is
kept. The window that remains is a push that found an old orphan already stored (and so did not upload
it) and writes its manifest between that second listing and the delete. Reading that dataset then
fails in one line naming the file and the object, and pushing the same data again re-uploads what is
missing (`push_dataset` repairs a complete dataset's objects). Run gc when no push is running to
close the window entirely.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from protein.data.manifest import (
    DATASET_MANIFEST,
    DATASETS_PREFIX,
    MANIFEST_KEY,
    OBJECTS_PREFIX,
    digest_of_object_key,
    parse_manifest,
)
from protein.errors import DataError, NotFound, RecordError
from protein.storage import Store
from protein.storage.records import load_record

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_S = 24 * 3600


@dataclass(frozen=True)
class ObjectsGcPlan:
    datasets: int  # complete datasets whose manifests were read
    named: int  # distinct content objects those manifests name
    orphans: list[str] = field(default_factory=list)  # keys to delete
    young: list[str] = field(default_factory=list)  # orphans the age guard keeps
    orphan_bytes: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"datasets": self.datasets, "named_objects": self.named, "orphans": len(self.orphans),
                "orphan_bytes": self.orphan_bytes, "kept_young_orphans": len(self.young)}


def named_objects(store: Store) -> tuple[int, set[str]]:
    """(how many manifests, the SHA-256 of every object a format-2 manifest names)."""
    named: set[str] = set()
    count = 0
    for key in store.list(f"{DATASETS_PREFIX}/"):
        match = MANIFEST_KEY.match(key)
        if match is None:
            continue
        where = f"{store.uri.rstrip('/')}/{key}"
        try:
            manifest = parse_manifest(load_record(store, key, DATASET_MANIFEST), where, match.group(1))
        except NotFound:  # removed since the listing: it names nothing any more
            continue
        except (RecordError, DataError) as exc:
            raise RecordError(f"{exc}; gc deletes nothing while a dataset manifest cannot be read "
                              "(fix or delete that manifest first)") from None
        count += 1
        if manifest.content_addressed:
            named.update(entry.sha256 for entry in manifest.files.values())
    return count, named


def plan_objects_gc(store: Store, min_age_s: float = DEFAULT_MIN_AGE_S, now: float | None = None) -> ObjectsGcPlan:
    """What gc would delete. Objects are listed after the manifests, so an object a push uploads after the
    manifest listing is younger than the guard."""
    if min_age_s < 0:
        raise DataError(f"the gc age guard must be >= 0 hours, got {min_age_s / 3600:g}")
    datasets, named = named_objects(store)
    cutoff = (time.time() if now is None else now) - min_age_s
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
    return ObjectsGcPlan(datasets, len(named), orphans, young, orphan_bytes)


def apply_objects_gc(store: Store, plan: ObjectsGcPlan) -> int:
    """Delete the plan's orphans, except any a manifest written since the plan names; returns how many."""
    _, named_now = named_objects(store)
    doomed = [key for key in plan.orphans if digest_of_object_key(key) not in named_now]
    if len(doomed) < len(plan.orphans):
        log.info("%d orphans are named by a manifest written since the plan; kept", len(plan.orphans) - len(doomed))
    if doomed:
        store.delete_keys(doomed)
    log.info("deleted %d orphaned content objects from %s", len(doomed), store.uri)
    return len(doomed)
