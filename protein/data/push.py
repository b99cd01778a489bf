"""Datasets in the object store: `protein datasets push` and `protein datasets list`.

A pushed dataset is ``datasets/<fingerprint>/manifest.json`` (format 2, protein.data.manifest): each
logical file (canonical flat layout: train.csv, sample_submission.csv, train/, test/, whatever layout it
came from, so its fingerprint is the source's) names a content object
``datasets/objects/<sha256[:2]>/<sha256>`` holding its bytes. A push uploads only the objects the store
lacks, so a dataset that differs from the last push by k images costs k uploads and the manifest.

Complete-or-invisible: objects are written create-only first, the manifest last and create-only; a
reader trusts a dataset only once its manifest exists, and by then every object it names was uploaded
or found in the listing. An interrupted push leaves only objects no manifest names, which
`protein datasets gc` collects once they are older than its guard.

An object found in the listing is not uploaded again, so it must still exist when the manifest lands:
the push writes a marker (``datasets/pushes/<random>.json``) before it lists, waits out a running gc
(``datasets/gc.lock``), and removes the marker when done, failed or not; gc deletes nothing while a
live marker exists (protein.data.gc_coordination says why one of the two always sees the other).

Which objects exist is learned from one listing of ``datasets/objects/`` (1,000 keys per request),
not a HEAD per file: the real set (27,479 files) costs 28 list requests instead of 27,479 HEADs, and
even after a year of daily 500-image pushes (~210,000 objects) 210 list requests are fewer than the
files of one push. The listing also gives each object's size, so a truncated object is re-checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protein.data.digests import FileDigest, md5_bytes
from protein.data.fingerprint import fingerprint_of
from protein.data.gc_coordination import DEFAULT_TIMES, CoordinationTimes, PushMarker
from protein.data.manifest import (
    DATASET_MANIFEST,
    DATASETS_PREFIX,
    FINGERPRINT,
    MANIFEST,
    MANIFEST_KEY,
    OBJECTS_PREFIX,
    ManifestEntry,
    is_dataset_file_name,
    manifest_doc,
    manifest_key,
    object_key,
    parse_manifest,
)
from protein.data.sources import DatasetSource
from protein.data.tables import load_competition
from protein.errors import DataError, PreconditionFailed, RecordError, StoreError
from protein.storage import Store
from protein.storage.records import load_record

log = logging.getLogger(__name__)

UPLOAD_THREADS = 8


@dataclass(frozen=True)
class PushResult:
    uri: str
    fingerprint: str
    files: int
    bytes: int
    uploaded: int  # content objects written by this push
    already_pushed: bool
    uploaded_bytes: int = 0


def dataset_uri(store: Store, fingerprint: str) -> str:
    return f"{store.uri.rstrip('/')}/{DATASETS_PREFIX}/{fingerprint}/"


def stored_objects(store: Store) -> dict[str, int]:
    """Every content object in the store and its size, from one listing."""
    return {info.key: info.size for info in store.list_info(f"{OBJECTS_PREFIX}/")}


def _entries(source: DatasetSource, names: list[str], digests: dict[str, FileDigest]) -> dict[str, ManifestEntry]:
    """Each file's size and MD5 (the fingerprint's) and SHA-256 (its object's name). A folder's SHA-256s
    come from the hash cache, so a re-push reads only new or changed files; every uploaded byte is
    checked against its SHA-256 again on the way out (`_put_object`)."""
    sha256s = source.sha256s(names)
    # Both digests must describe the same bytes: a file rewritten between the MD5 and the SHA-256 pass
    # shows in its identity (the hash caches' key), so the fingerprint taken again differs.
    again = source.digests()
    changed = sorted(name for name in names if again.get(name) != digests[name])
    if changed:
        raise DataError(f"{source.locate(changed[0])}: changed while being pushed ({len(changed)} file(s)); "
                        "push again when it is stable")
    return {name: ManifestEntry(digests[name].size, digests[name].md5, sha256s[name]) for name in names}


def _put_object(store: Store, source: DatasetSource, name: str, entry: ManifestEntry) -> int:
    """Create the content object for `name`; returns the bytes uploaded (0 if a concurrent push made it)."""
    key = object_key(entry.sha256)
    blob = source.read_bytes(name)
    if (len(blob) != entry.size or hashlib.sha256(blob).hexdigest() != entry.sha256
            or md5_bytes(blob) != entry.md5):
        raise DataError(f"{source.locate(name)}: changed while being pushed; push again when it is stable")
    try:
        store.put_bytes(key, blob, if_none_match=True)
        return len(blob)
    except PreconditionFailed:
        pass
    # Someone else created it since the listing: it must hold these bytes, since its name is their hash.
    recorded = store.recorded_sha256(key)
    if recorded is not None and recorded[0] == entry.size and recorded[1] in (None, entry.sha256):
        return 0
    raise StoreError(f"{store.uri.rstrip('/')}/{key}: content object for {name} holds other bytes than its "
                     "SHA-256 name says (corrupt); delete it, then push again")


def _repair(store: Store, source: DatasetSource, key: str, uri: str) -> tuple[int, int]:
    """A dataset already pushed: upload any object its manifest names that the store lacks (deleted by
    hand, or by a gc racing the push that first relied on it). Costs the manifest and one listing."""
    manifest = parse_manifest(load_record(store, key, DATASET_MANIFEST), f"{uri}{MANIFEST}", key.split("/")[1])
    if not manifest.content_addressed:
        log.info("%s is already in the store (a full copy)", uri)
        return 0, 0
    present = stored_objects(store)
    todo: dict[str, str] = {}
    for name, entry in manifest.files.items():
        if present.get(object_key(entry.sha256)) != entry.size:
            todo.setdefault(entry.sha256, name)
    sizes = [_put_object(store, source, name, manifest.files[name]) for name in todo.values()]
    if todo:
        log.warning("%s was in the store with %d content objects missing; uploaded them again", uri, len(todo))
    else:
        log.info("%s is already in the store", uri)
    return sum(1 for size in sizes if size), sum(sizes)


def push_dataset(
    data: str, store: Store, cache_dir: Path | None = None, progress: Callable[[int], None] | None = None,
    times: CoordinationTimes = DEFAULT_TIMES, on_complete: Callable[[PushResult], None] | None = None,
) -> PushResult:
    """Upload a dataset (folder, zip or s3:// URI) to `store` as content objects plus a format-2 manifest
    at datasets/<fingerprint>/manifest.json; only objects the store lacks travel. Everything that
    touches the store runs under a push marker, after any running `datasets gc` has ended
    (protein.data.gc_coordination; `StoreBusy` if it does not end within ``times.push_wait_s``).
    ``on_complete(result)`` runs once the manifest is there, still under the marker: the channel moves
    there, so a `datasets remove` that sees no marker also sees the channel naming this dataset."""
    parsed = load_competition(data, require_test=False, cache_dir=cache_dir)  # refuse a non-dataset first
    source: DatasetSource = parsed.source
    digests = source.digests()
    fp = fingerprint_of(digests)
    key = manifest_key(fp)
    uri = dataset_uri(store, fp)
    total = sum(d.size for d in digests.values())
    names = sorted(digests)
    with PushMarker(store, times) as marker:
        if store.exists(key):
            uploaded, uploaded_bytes = _repair(store, source, key, uri)
            repaired = PushResult(uri, fp, len(digests), total, uploaded, True, uploaded_bytes)
            if on_complete is not None:
                on_complete(repaired)
            return repaired
        for name in names:  # the manifest carries names: check them all before reading or writing anything
            if not is_dataset_file_name(name):
                raise DataError(f"{source.locate(name)}: this file name cannot be an object key (use letters, "
                                "digits, '.', '_', '=' or '-'); rename or remove it before pushing")
        entries = _entries(source, names, digests)

        def upload(name: str) -> int:
            size = _put_object(store, source, name, entries[name])
            if progress:
                progress(1)
            return size

        sizes: list[int] = []
        sent: set[str] = set()  # the contents this push uploaded, over every listing
        while True:
            # Listed under the marker, after any gc ended: what this listing shows stays until the manifest.
            present = stored_objects(store)
            todo: dict[str, str] = {}  # sha256 -> one name holding those bytes (a dataset may repeat content)
            for name in names:
                if present.get(object_key(entries[name].sha256)) != entries[name].size:
                    todo.setdefault(entries[name].sha256, name)
            sent.update(todo)
            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                sizes += pool.map(upload, todo.values())
            if marker.fresh():
                break
            # So slow that gc would now call the marker stale: a new marker, then list again.
            marker.renew()
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        doc = manifest_doc(fp, entries, created, len(parsed.train_ids), len(parsed.test_ids))
        # Last, and create-only: the moment it exists the dataset is complete; two concurrent pushes of the
        # same data both succeed (same fingerprint, same objects).
        try:
            store.put_bytes(key, json.dumps(doc, indent=1, sort_keys=True).encode(), if_none_match=True)
        except PreconditionFailed:
            log.info("%s was completed by a concurrent push of the same data", uri)
        uploaded = sum(1 for size in sizes if size)
        log.info("pushed %s: %d files, %d objects uploaded (%d bytes), %d already stored", uri, len(names), uploaded,
                 sum(sizes), sum(1 for name in names if entries[name].sha256 not in sent))
        result = PushResult(uri, fp, len(names), total, uploaded, False, sum(sizes))
        if on_complete is not None:
            on_complete(result)
    return result


def list_datasets(store: Store) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete datasets (those with a manifest), newest first, and the prefixes of incomplete pushes."""
    keys = store.list(f"{DATASETS_PREFIX}/")
    complete: list[dict[str, Any]] = []
    prefixes: set[str] = set()
    for key in keys:
        parts = key.split("/")
        # Only dataset folders: channels/ and objects/ sit beside them.
        if len(parts) >= 3 and FINGERPRINT.fullmatch(parts[1]):
            prefixes.add(parts[1])
        match = MANIFEST_KEY.match(key)
        if not match:
            continue
        try:
            manifest = parse_manifest(load_record(store, key, DATASET_MANIFEST), f"{store.uri.rstrip('/')}/{key}",
                                      match.group(1)).doc
        except (RecordError, DataError) as exc:
            log.warning("%s; skipped", exc)
            continue
        complete.append({
            "fingerprint": match.group(1),
            "uri": dataset_uri(store, match.group(1)),
            "created": manifest.get("created"),
            "train_images": manifest.get("train_images"),
            "test_images": manifest.get("test_images"),
            "bytes": manifest.get("bytes"),
            "format": manifest.get("format"),
        })
    done = {row["fingerprint"] for row in complete}
    incomplete = sorted(f"{DATASETS_PREFIX}/{p}/" for p in prefixes - done)
    complete.sort(key=lambda row: str(row["created"]), reverse=True)
    return complete, incomplete
