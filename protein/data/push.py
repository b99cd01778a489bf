"""Datasets in the object store: `protein datasets push` and `protein datasets list`.

A pushed dataset lives at ``datasets/<fingerprint>/`` in the canonical flat layout (train.csv,
sample_submission.csv, train/, test/) whatever layout it came from, so its fingerprint is the source's.
It is immutable and complete-or-invisible:

- every object is written create-only (a re-push after an interruption keeps what is there when the
  bytes are the same, and refuses when they differ);
- ``manifest.json`` is written last, listing every file with size, MD5 and SHA-256; readers trust a
  dataset only once its manifest exists (protein.data.s3), and `list` shows only those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protein.data.digests import FileDigest, md5_bytes
from protein.data.fingerprint import fingerprint_of
from protein.data.layout import TEST_DIR, TRAIN_DIR
from protein.data.s3 import DATASET_MANIFEST, MANIFEST, MANIFEST_FORMAT
from protein.data.sources import DatasetSource
from protein.data.tables import load_competition
from protein.errors import DataError, NotFound, PreconditionFailed, RecordError, StoreError
from protein.storage import Store, validate_key
from protein.storage.records import load_record

log = logging.getLogger(__name__)

DATASETS_PREFIX = "datasets"
UPLOAD_THREADS = 8
_MANIFEST_KEY = re.compile(rf"^{DATASETS_PREFIX}/([0-9a-f]{{16}})/{re.escape(MANIFEST)}$")


@dataclass(frozen=True)
class PushResult:
    uri: str
    fingerprint: str
    files: int
    bytes: int
    uploaded: int
    already_pushed: bool


def dataset_uri(store: Store, fingerprint: str) -> str:
    return f"{store.uri.rstrip('/')}/{DATASETS_PREFIX}/{fingerprint}/"


def _put_once(store: Store, key: str, data: bytes) -> bool:
    """Create `key` with `data`; True if written, False if the same bytes were already there."""
    try:
        store.put_bytes(key, data, if_none_match=True)
        return True
    except PreconditionFailed:
        try:
            existing = store.get_bytes(key)
        except NotFound:  # deleted between the two calls: write it now
            store.put_bytes(key, data, if_none_match=True)
            return True
        if hashlib.sha256(existing).digest() != hashlib.sha256(data).digest():
            raise StoreError(f"{store.uri.rstrip('/')}/{key}: already holds other bytes; a pushed dataset is "
                             "immutable (delete the incomplete push, then push again)") from None
        return False


def push_dataset(
    data: str, store: Store, cache_dir: Path | None = None, progress: Callable[[int], None] | None = None
) -> PushResult:
    """Upload a dataset (folder, zip or s3:// URI) to datasets/<fingerprint>/ in `store`."""
    parsed = load_competition(data, require_test=False, cache_dir=cache_dir)  # refuse a non-dataset first
    source: DatasetSource = parsed.source
    digests = source.digests()
    fp = fingerprint_of(digests)
    base = f"{DATASETS_PREFIX}/{fp}"
    uri = dataset_uri(store, fp)
    total = sum(d.size for d in digests.values())
    if store.exists(f"{base}/{MANIFEST}"):
        log.info("%s is already in the store", uri)
        return PushResult(uri, fp, len(digests), total, 0, True)
    names = sorted(digests)
    for name in names:  # keys are built from file names: check them all before writing anything
        try:
            validate_key(f"{base}/{name}")
        except ValueError:
            raise DataError(f"{source.locate(name)}: this file name cannot be an object key (use letters, digits, "
                            "'.', '_', '=' or '-'); rename or remove it before pushing") from None
    entries: dict[str, dict[str, Any]] = {}

    def upload(name: str) -> bool:
        blob = source.read_bytes(name)
        if FileDigest(len(blob), md5_bytes(blob)) != digests[name]:
            raise DataError(f"{source.locate(name)}: changed while being pushed; push again when it is stable")
        entries[name] = {"size": len(blob), "md5": digests[name].md5, "sha256": hashlib.sha256(blob).hexdigest()}
        written = _put_once(store, f"{base}/{name}", blob)
        if progress:
            progress(1)
        return written

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        uploaded = sum(pool.map(upload, names))
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fp,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "train_images": sum(1 for n in names if n.startswith(f"{TRAIN_DIR}/")),
        "test_images": sum(1 for n in names if n.startswith(f"{TEST_DIR}/")),
        "train_rows": len(parsed.train_ids),
        "test_rows": len(parsed.test_ids),
        "bytes": total,
        "files": {name: entries[name] for name in names},
    }
    # Last, and create-only: the moment it exists the dataset is complete; two concurrent pushes of the
    # same data both succeed (same fingerprint, same files).
    try:
        store.put_bytes(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode(),
                        if_none_match=True)
    except PreconditionFailed:
        log.info("%s was completed by a concurrent push of the same data", uri)
    log.info("pushed %s: %d files, %d uploaded", uri, len(names), uploaded)
    return PushResult(uri, fp, len(names), total, uploaded, False)


def list_datasets(store: Store) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete datasets (those with a manifest), newest first, and the prefixes of incomplete pushes."""
    keys = store.list(f"{DATASETS_PREFIX}/")
    complete: list[dict[str, Any]] = []
    prefixes: set[str] = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3:
            prefixes.add(parts[1])
        match = _MANIFEST_KEY.match(key)
        if not match:
            continue
        try:
            manifest = load_record(store, key, DATASET_MANIFEST)
        except RecordError as exc:
            log.warning("%s; skipped", exc)
            continue
        complete.append({
            "fingerprint": match.group(1),
            "uri": dataset_uri(store, match.group(1)),
            "created": manifest.get("created"),
            "train_images": manifest.get("train_images"),
            "test_images": manifest.get("test_images"),
            "bytes": manifest.get("bytes"),
        })
    done = {row["fingerprint"] for row in complete}
    incomplete = sorted(f"{DATASETS_PREFIX}/{p}/" for p in prefixes - done)
    complete.sort(key=lambda row: str(row["created"]), reverse=True)
    return complete, incomplete
