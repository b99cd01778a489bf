"""The Data Docs history, synced incrementally between the store and a host-local mirror.

Great Expectations builds the Data Docs index from every earlier run's results, and lists a run
only if the site already holds its page, so each validation needs the whole history locally. It
used to download all of it on every run, so validation cost grew with every night. Results and
pages of a run never change once written, so a persistent mirror in the host's cache
(`<cache>/validation-history/<store>/`) is kept: each run lists the store once and downloads only
the keys the mirror lacks, and uploads only the files the store lacks (plus the index and assets,
which change). A mirror file whose key is no longer in the store (an operator removed it) is not
offered to GX, so the history shown is always the store's.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import shutil
from pathlib import Path
from typing import Any

from protein.atomic import write_bytes_atomic
from protein.locations import default_cache_dir

log = logging.getLogger(__name__)

# What a run writes once and never changes: every validation result, and the docs' per-run pages
# (the site's index and assets are rebuilt every run).
ALL_RESULTS: tuple[str, ...] = ("",)
RUN_PAGES: tuple[str, ...] = ("validations/",)
_KEY_PART = re.compile(r"[A-Za-z0-9._=+:-]+")


def valid_rel(rel: str) -> bool:
    return bool(rel) and all(_KEY_PART.fullmatch(part) for part in rel.split("/"))


def mirror_root(store: Any, cache_dir: Path | None = None) -> Path:
    """This host's mirror of `store`'s validation history (one per store)."""
    name = hashlib.sha256(store.uri.encode()).hexdigest()[:24]
    return (cache_dir or default_cache_dir()) / "validation-history" / name


def sync_down(store: Any, prefix: str, mirror: Path, folder: Path) -> tuple[set[str], int]:
    """Put the store's files under `prefix` into `folder` (copies from the mirror, which gets only
    what it lacks; copies, not links, since GX may rewrite files in its project). Returns (the
    store's keys under prefix, how many were downloaded)."""
    keys = set(store.list(f"{prefix}/"))
    downloaded = 0
    for key in sorted(keys):
        rel = key[len(prefix) + 1 :]
        if not valid_rel(rel):
            continue
        cached = mirror / rel
        if not cached.is_file():
            write_bytes_atomic(cached, store.get_bytes(key))
            downloaded += 1
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, target)
    if downloaded:
        log.info("validation history %s: %d new files from the store, %d already here", prefix, downloaded,
                 len(keys) - downloaded)
    return keys, downloaded


def upload_new(store: Any, folder: Path, prefix: str, existing: set[str], immutable: tuple[str, ...],
               mirror: Path | None = None) -> int:
    """Upload `folder` under `prefix`, skipping files under the `immutable` relative prefixes that the
    store already holds (`existing`, from one listing); new immutable files also enter the mirror
    (rooted like `folder`). Returns how many were uploaded."""
    uploaded = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if not valid_rel(rel):
            log.warning("not uploading %s: its name is not a valid store key", rel)
            continue
        key = f"{prefix}/{rel}"
        written_once = rel.startswith(immutable)
        if written_once and key in existing:
            continue  # earlier runs' results and pages do not change
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        store.put_bytes(key, path.read_bytes(), content_type=content_type)
        uploaded += 1
        if written_once and mirror is not None:  # GX is done with the file: the mirror may share it
            cached = mirror / rel
            cached.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, cached)
    return uploaded


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, target)
