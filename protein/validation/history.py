"""The Data Docs history, synced incrementally between the store and a host-local mirror.

Great Expectations builds the Data Docs index from every earlier run's results, and lists a run
only if the site already holds its page, so each validation needs the whole history locally. It
used to download all of it on every run, so validation cost grew with every night. Results and
pages of a run never change once written, so a persistent mirror in the host's cache
(`<cache>/validation-history/<store>/`) is kept: each run lists the store once and downloads only
the keys the mirror lacks, and uploads only the files the store lacks (plus the index and assets,
which change). A mirror file whose key is no longer in the store (an operator removed it) is not
offered to GX, so the history shown is always the store's.

The history is bounded: GX lists every stored result in the index and each run re-uploads the
index, so a nightly validation that kept every run got slower every night (300 earlier runs: 8 s
instead of 3, a 5.5 MB index). Before GX runs, `prune_history` removes the runs beyond the newest
$PROTEIN_DOCS_KEEP_RUNS (results and pages) from the store and from this host's mirror, and only
the kept ones enter the GX project.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from protein.atomic import atomic_path, write_bytes_atomic
from protein.cache_budget import MIRROR_FOLDER
from protein.errors import NotFound, StoreError
from protein.locations import default_cache_dir
from protein.storage.base import env_number

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
    return (cache_dir or default_cache_dir()) / MIRROR_FOLDER / name


# ---- the bound: the newest runs only -------------------------------------------------------------

KEEP_RUNS_ENV = "PROTEIN_DOCS_KEEP_RUNS"
DEFAULT_KEEP_RUNS = 90  # three months of nightly runs
# GX's run time in a key (RunIdentifier.to_tuple: "%Y%m%dT%H%M%S.%fZ", UTC): fixed width, so the
# strings sort as the times do.
_RUN_TIME = re.compile(r"\d{8}T\d{6}\.\d{6}Z")


class RunId(NamedTuple):
    """One validation run, as GX names it in every key of its results and pages. Ordered by the run
    time first: "newest" is when the run happened, whichever host uploaded it and whenever."""

    run_time: str
    run_name: str


def keep_runs_setting() -> int:
    """How many validation runs the Data Docs history keeps: $PROTEIN_DOCS_KEEP_RUNS, a whole number
    >= 1, else DEFAULT_KEEP_RUNS."""
    value = env_number(KEEP_RUNS_ENV, float(DEFAULT_KEEP_RUNS))
    if not value.is_integer():  # 2.5 runs, inf, nan: no count of runs
        raise ValueError(f"{KEEP_RUNS_ENV} must be a whole number of runs, got {os.environ.get(KEEP_RUNS_ENV)!r}")
    return int(value)


def run_of(rel: str) -> RunId | None:
    """The run a result or page belongs to, from its path under the history's prefix:
    <suite, one folder per dotted part>/<run name>/<run time>/<batch>.json|.html. None for
    anything else (GX's .ge_store_backend_id), which is never pruned."""
    parts = rel.split("/")
    if len(parts) < 4 or not _RUN_TIME.fullmatch(parts[-2]):
        return None
    return RunId(run_time=parts[-2], run_name=parts[-3])


def runs_beyond(runs: Iterable[RunId], keep: int) -> set[RunId]:
    """The runs older than the newest `keep`."""
    ordered = sorted(set(runs))
    return set(ordered[: max(len(ordered) - keep, 0)])


def prune_history(store: Any, listed: Mapping[str, set[str]], mirrors: Mapping[str, Path],
                  keep: int) -> dict[str, set[str]]:
    """Remove the runs beyond the newest `keep` from the store and from this host's mirror, over the
    history's prefixes together (`listed`: each prefix's keys, from one listing; `mirrors`: each
    prefix's mirror folder). Returns each prefix's keys that remain: the only ones to offer GX.

    Only keys of this listing are deleted, so a run another host writes meanwhile is never touched
    (and it is newer than all of them); a key another host already deleted is no error. A refused
    delete (a role without s3:DeleteObject there) is a warning: the run still offers GX only the
    kept runs, and the next run tries again."""
    runs = {key: run for prefix, keys in listed.items() for key in keys
            if (run := run_of(key[len(prefix) + 1 :])) is not None}
    pruned = runs_beyond(runs.values(), keep)
    if not pruned:
        return {prefix: set(keys) for prefix, keys in listed.items()}
    doomed = sorted(key for key, run in runs.items() if run in pruned)
    try:
        store.delete_keys(doomed)
        log.info("validation history: removed %d runs older than the newest %d from the store (%d files)",
                 len(pruned), keep, len(doomed))
    except StoreError as exc:
        log.warning("validation history: could not remove %d runs older than the newest %d from the store (%s); "
                    "this run still uses only the newest, the next run tries again", len(pruned), keep, exc)
    # Also what the store no longer lists (another host pruned it) but this mirror still holds.
    newest_pruned = max(pruned)
    for mirror in mirrors.values():
        _prune_mirror(mirror, newest_pruned)
    gone = set(doomed)
    return {prefix: keys - gone for prefix, keys in listed.items()}


def _prune_mirror(mirror: Path, newest_pruned: RunId) -> None:
    """Remove the mirror's files of runs at or before `newest_pruned`, and the folders that leaves
    empty (only those: another run on this host may be creating a new run's folders)."""
    emptied: set[Path] = set()
    for folder, _, files in os.walk(mirror):
        for name in files:
            path = Path(folder) / name
            run = run_of(path.relative_to(mirror).as_posix())
            if run is not None and run <= newest_pruned:
                path.unlink(missing_ok=True)
                emptied.add(path.parent)
    for folder in sorted(emptied, key=lambda f: len(f.parts), reverse=True):
        while folder != mirror and mirror in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: another run's files live here
            folder = folder.parent


# ---- moving the history between the store, the mirror and the GX project ------------------------


def sync_down(store: Any, prefix: str, keys: set[str], mirror: Path, folder: Path) -> tuple[set[str], int]:
    """Put the store's files `keys` under `prefix` into `folder` (copies from the mirror, which gets
    only what it lacks; copies, not links, since GX may rewrite files in its project). Returns (the
    keys that were there, how many were downloaded): a key another host pruned since the listing
    is left out."""
    present = set(keys)
    downloaded = 0
    for key in sorted(keys):
        rel = key[len(prefix) + 1 :]
        if not valid_rel(rel):
            continue
        cached, target = mirror / rel, folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if _copy_if_there(cached, target):
            continue
        try:
            data = store.get_bytes(key)
        except NotFound:
            present.discard(key)  # pruned by another run since this one listed it
            continue
        downloaded += 1
        target.write_bytes(data)
        try:
            write_bytes_atomic(cached, data, durable=False)
        except OSError as exc:  # a run on this host pruned its folder meanwhile: fetched again next time
            log.debug("not mirrored: %s (%s)", cached, exc)
    if downloaded:
        log.info("validation history %s: %d new files from the store, %d already here", prefix, downloaded,
                 len(present) - downloaded)
    return present, downloaded


def _copy_if_there(source: Path, target: Path) -> bool:
    try:
        shutil.copyfile(source, target)
    except FileNotFoundError:  # not mirrored yet, or pruned by a run on this host meanwhile
        return False
    return True


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
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(path, cached)
            except OSError as exc:  # a run on this host pruned the folder meanwhile: fetched again later
                log.debug("not mirrored: %s (%s)", cached, exc)
    return uploaded


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        # Through a temp file: a copy cut short (a full disk, a kill) under the final name would be
        # trusted as complete by every later run, which skips a mirror file that exists.
        with atomic_path(target, durable=False) as tmp:
            shutil.copyfile(source, tmp)
