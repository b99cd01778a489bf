"""A size bound on a host's cache folder, kept automatically: least recently used entries go first.

A CPU host that runs the nightly for a month downloads a dataset per push, a model per gate and
decodes a split per image size; without a bound it fills its disk. After every write into the
cache (a decoded split, a downloaded model, a fetched dataset folder or zip) the writer calls
`enforce_cache_budget`, which removes whole entries, oldest last use first, until the cache is
within `$PROTEIN_CACHE_MAX_GB` (default `DEFAULT_MAX_GB`). Hash caches and the Data Docs mirror are
written without that call: the next one counts them.

What counts as an entry, under the cache root (every folder the cache holds is one of these kinds,
or is named below as never evicted):
- a decoded split: `<name>.npy` + `<name>.json` (last use: the .json's mtime, touched on every hit);
  its `<name>.lock` stays, so two processes always lock the same file; a `<name>.npy` without its
  .json (a build or pull that died before the meta) is an entry of its own, never removed while a
  build holds `<name>.lock`;
- a downloaded model version: `models/<version>/` (last use: the folder's mtime, touched on use);
- a dataset file or zip fetched from S3: `datasets/objects/**`, `datasets/zips/*` (last use: mtime,
  touched on read and on every cache hit);
- a pushed dataset's fetched manifest: `datasets/manifests/*` (one per dataset a host opens, megabytes
  for a large one; last use: mtime, touched on every hit);
- a hash cache: `datasets/hashes/*` (one per dataset folder, zip or algorithm; last use: mtime, which
  moves only when the cache is rewritten: losing one costs a re-hash, never a wrong digest);
- a file of the Data Docs mirror, `validation-history/<store>/**` (protein.validation.history; last
  use: mtime, its download or the run that wrote it). One entry per file, so an evicted file is
  downloaded again by the next validation that needs it; a folder the eviction emptied goes once it
  has stayed empty for `RECENT_USE_S`.

Never removed, whatever the bound: an entry used within the last `RECENT_USE_S` (a run on this
host may be reading it right now; a file unlinked under an open descriptor stays readable on
POSIX, but a process that has yet to open it would miss it), the entries the caller names (the one
it just wrote, the files it is about to read), and a zip some process reads in place (an open
`ZipSource` holds its `use_lock` shared: its decode workers reopen the zip by path, whenever its
last use was). When only such entries are left and the cache is still over the bound, a warning
says so.

Not entries, so never evicted for the bound: lock files (`*.lock`, `datasets/locks/`; a lock deleted
while held lets a second process lock a new file of the same name), and temp or partial files
(`.<name>.<random>.tmp` of an atomic write or a download, `<name>.part` of a resumable one). A process
killed mid-write (OOM, preemption) leaves those behind, a decoded split's temp file as large as the
split: the bound and `protein cache gc` remove one once it is `STALE_TEMP_S` without a write and its
writer's lock (where it has one) is free.

The mirror has no lock: a validation copies its files out without marking them used, so an old
mirror file may go while a validation reads the mirror, and a folder that stood empty for an hour may
go just as a validation writes into it. Its readers must take a mirror file that vanished for one not
mirrored yet (download it) and skip a mirror write that failed, as protein.validation.history's
`sync_down` and `upload_new` do for its own pruning: then the bound costs a download, never a
validation.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_GB_ENV = "PROTEIN_CACHE_MAX_GB"
DEFAULT_MAX_GB = 50.0
RECENT_USE_S = 3600.0
# A temp or partial file unmodified this long has no live writer: a decode dirties its memory-mapped
# temp file (so its mtime moves) chunk after chunk, and a download writes every chunk it receives and
# fails after the S3 read timeout (60 s by default, PROTEIN_S3_READ_TIMEOUT_S) without one.
STALE_TEMP_S = RECENT_USE_S
IMAGE_SUFFIXES = (".npy", ".json")  # the files of a decoded split, written through temp files
# The folders of datasets/ whose files are entries, one per file; datasets/locks/ is not one of them.
DATASET_ENTRY_FOLDERS = ("objects", "zips", "manifests", "hashes")
MIRROR_FOLDER = "validation-history"  # protein.validation.history.mirror_root: <cache>/validation-history/<store>/


@dataclass(frozen=True)
class CacheEntry:
    """One removable unit of the cache: its files, their total size and when it was last used."""

    name: str
    paths: tuple[Path, ...]  # the first one's mtime is last_used
    size: int
    last_used: float
    lock: Path | None = None  # held shared while a process reads the entry in place: then never removed


def max_cache_bytes() -> int:
    """The bound in bytes: $PROTEIN_CACHE_MAX_GB (a positive number of GiB), else DEFAULT_MAX_GB."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{MAX_GB_ENV}={text!r}: expected a positive number of GiB") from None
    if not (math.isfinite(value) and value > 0):  # inf would overflow the int of bytes, NaN bounds nothing
        raise ValueError(f"{MAX_GB_ENV}={text!r}: expected a positive number of GiB")
    return int(value * 2**30)


def choose_evictions(entries: Iterable[CacheEntry], max_bytes: int, now: float,
                     keep: frozenset[str] = frozenset(), recent_s: float = RECENT_USE_S) -> list[CacheEntry]:
    """The entries to remove, least recently used first, so that the rest fit in max_bytes.
    Entries in `keep` or used within `recent_s` of `now` are never chosen."""
    ordered = sorted(entries, key=lambda e: (e.last_used, e.name))
    total = sum(e.size for e in ordered)
    chosen = []
    for entry in ordered:
        if total <= max_bytes:
            break
        if entry.name in keep or now - entry.last_used < recent_s:
            continue
        chosen.append(entry)
        total -= entry.size
    return chosen


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # removed by another process since it was listed
        return None


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            st = _stat(Path(dirpath) / filename)
            total += st.st_size if st else 0
    return total


def _image_entries(root: Path) -> Iterator[CacheEntry]:
    for meta in root.glob("*.json"):
        array = meta.with_suffix(".npy")
        meta_stat, array_stat = _stat(meta), _stat(array)
        if meta_stat is None:
            continue
        size = meta_stat.st_size + (array_stat.st_size if array_stat else 0)
        # The meta first: its mtime is the entry's last use (re-read before removal), and a split
        # without it reads as absent, never as a meta whose array is gone.
        yield CacheEntry(f"images/{meta.stem}", (meta, array), size, meta_stat.st_mtime)
    # An array without its meta: a build killed between moving the array into place and writing the
    # meta (it hashes the array in between), or a pull whose meta download failed. Nothing reads or
    # rebuilds it once its data is superseded, so it is an entry too, under the lock a build holds.
    for array in root.glob("*.npy"):
        if array.with_suffix(".json").exists():
            continue
        array_stat = _stat(array)
        if array_stat is not None:
            yield CacheEntry(f"images/{array.stem}", (array,), array_stat.st_size, array_stat.st_mtime,
                             root / f"{array.stem}.lock")


def _model_entries(root: Path) -> Iterator[CacheEntry]:
    models = root / "models"
    if not models.is_dir():
        return
    for folder in models.iterdir():
        st = _stat(folder)
        if st is not None and folder.is_dir():
            yield CacheEntry(f"models/{folder.name}", (folder,), _tree_size(folder), st.st_mtime)


def _is_temp(filename: str) -> bool:
    """A file being written (or left by a writer that died): an atomic write's or download's temp file, a
    resumable download's .part."""
    return (filename.startswith(".") and filename.endswith(".tmp")) or filename.endswith(".part")


def _dataset_entries(root: Path) -> Iterator[CacheEntry]:
    for sub in DATASET_ENTRY_FOLDERS:
        folder = root / "datasets" / sub
        if not folder.is_dir():
            continue
        for dirpath, _, filenames in os.walk(folder):
            for filename in filenames:
                # Lock files are not entries: zip locks lived in zips/ before they moved to locks/.
                if filename.startswith(".") or _is_temp(filename) or filename.endswith(".lock"):
                    continue
                path = Path(dirpath) / filename
                st = _stat(path)
                if st is not None:
                    yield CacheEntry(f"datasets/{path.relative_to(folder.parent)}", (path,), st.st_size, st.st_mtime,
                                     use_lock(path) if sub == "zips" else None)


def _mirror_entries(root: Path) -> Iterator[CacheEntry]:
    mirror = root / MIRROR_FOLDER
    for dirpath, _, filenames in os.walk(mirror):
        for filename in filenames:
            if _is_temp(filename):
                continue
            path = Path(dirpath) / filename
            st = _stat(path)
            if st is not None:
                yield CacheEntry(f"{MIRROR_FOLDER}/{path.relative_to(mirror).as_posix()}", (path,), st.st_size,
                                 st.st_mtime)


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every removable entry under the cache root (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [*_image_entries(root), *_model_entries(root), *_dataset_entries(root), *_mirror_entries(root)]


def _remove_empty_mirror_folders(root: Path, now: float) -> None:
    """Remove the mirror's folders that are empty and unchanged for `RECENT_USE_S`: what per-file
    eviction leaves of a run's folders. Unchanged ones only, since removing a file touches its folder:
    a folder emptied now goes on a later call, and a validation is raced only if it makes (exist_ok)
    a folder that has stood empty for an hour just as it goes, before writing its file into it."""
    mirror = root / MIRROR_FOLDER
    # Bottom up, with the listing taken before the children went: a parent whose last child goes now
    # has just changed, so it waits for a later call too.
    for dirpath, _, filenames in os.walk(mirror, topdown=False):
        folder = Path(dirpath)
        if folder == mirror or filenames:
            continue
        st = _stat(folder)
        if st is not None and now - st.st_mtime >= RECENT_USE_S:
            with contextlib.suppress(OSError):  # not empty: it holds a folder, or a validation wrote into it
                folder.rmdir()


def download_lock(path: Path) -> Path:
    """The lock under which one process downloads a file of datasets/<folder>/ (its .part included).
    In datasets/locks/, never beside the file, where it would look like part of the cache."""
    return path.parent.parent / "locks" / f"{path.parent.name}-{path.name}.lock"


def use_lock(path: Path) -> Path:
    """The lock readers of a file of datasets/<folder>/ hold shared (`EntryHold`) and the bound takes
    exclusive to remove it. Not the download lock: a process that holds a zip open and downloads it
    again (its copy deleted by hand) must not wait on itself."""
    return path.parent.parent / "locks" / f"{path.parent.name}-{path.name}.in-use.lock"


class EntryHold:
    """A shared lock on `use_lock(path)` until `release` or until this object is collected: meanwhile
    no process's bound removes the entry. For a zip read in place, whose decode workers reopen it by path
    at any time, however long ago the run opened it."""

    def __init__(self, path: Path) -> None:
        lock = use_lock(Path(path))
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        # Closing the descriptor is what releases a flock: on release(), on collection, at exit.
        self._close = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        self._close()


@contextlib.contextmanager
def exclusive_now(lock: Path | None) -> Iterator[bool]:
    """An exclusive flock on `lock` without waiting, held for the block: True if nobody else holds it
    (True for no lock at all). Readers and writers that come after wait until the block ends."""
    if lock is None:
        yield True
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # cannot even create the lock: treat the entry as in use rather than guess
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _writer_lock(root: Path, path: Path) -> Path | None:
    """The lock a live writer of this temp or partial file holds, where there is one."""
    target = path.name[: -len(".part")] if path.name.endswith(".part") else path.name[1:].rsplit(".", 2)[0]
    if path.parent == root:  # a decoded split's .npy or .json, written under <key>.lock (protein.cache)
        stem, suffix = os.path.splitext(target)
        return root / f"{stem}.lock" if suffix in IMAGE_SUFFIXES else None
    if path.parent.parent == root / "datasets" and path.parent.name in ("zips", "manifests"):
        return download_lock(path.parent / target)  # protein.data.s3.fetch_object holds it while it writes
    return None  # an object (its folder's download lock names no file), a hash cache, a mirror or model file:
    # the age alone says


def _temp_files(root: Path) -> Iterator[Path]:
    yield from root.glob(".*.tmp")
    datasets = root / "datasets"
    # And the mirror and the model folders: a validation or a model download killed while writing into
    # them (a temp file renamed when whole, no lock: the age alone says). A model folder in daily use is
    # never the least recently used, so the bound would never take its temps with it.
    for folder in (datasets, root / MIRROR_FOLDER, root / "models"):
        for dirpath, dirnames, filenames in os.walk(folder):
            if Path(dirpath) == datasets and "locks" in dirnames:
                dirnames.remove("locks")
            for filename in filenames:
                if _is_temp(filename):
                    yield Path(dirpath) / filename


def remove_stale_temps(root: Path, older_than_s: float = STALE_TEMP_S, now: float | None = None,
                       dry_run: bool = False) -> list[str]:
    """Remove temp and partial files under the cache root, datasets/, the validation mirror and models/
    that were not written for `older_than_s` (at least `STALE_TEMP_S`) and whose writer's lock is free;
    returns their paths relative to the root. What a process killed mid-write left: nothing else ever
    removes it."""
    root = Path(root)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    cutoff = now - max(older_than_s, STALE_TEMP_S)
    removed = []
    for path in sorted(_temp_files(root)):
        st = _stat(path)
        if st is None or st.st_mtime >= cutoff:
            continue
        with exclusive_now(_writer_lock(root, path)) as free:
            # Re-read under the writer's lock: a resumed download may have written since the listing.
            st = _stat(path)
            if not free or st is None or st.st_mtime >= cutoff:
                continue
            removed.append(path.relative_to(root).as_posix())
            if not dry_run:
                path.unlink(missing_ok=True)
    if removed and not dry_run:
        log.info("cache %s: removed %d temp files left by writers that died: %s", root, len(removed),
                 ", ".join(removed))
    return removed


def touch(path: Path) -> None:
    """Record a use (mtime), so the entry is the last the budget removes."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _in_use(entry: CacheEntry) -> bool:
    with exclusive_now(entry.lock) as free:
        return not free


def _remove(entry: CacheEntry) -> bool:
    """Remove the entry's files unless a process took its lock or used it since it was listed (a
    reader about to hold it, a download into a model folder: both move its mtime)."""
    with exclusive_now(entry.lock) as free:
        if not free:
            return False
        st = _stat(entry.paths[0])
        if st is not None and st.st_mtime > entry.last_used:
            return False
        for path in entry.paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return True


def enforce_cache_budget(root: Path, keep: Iterable[str] = (), max_bytes: int | None = None,
                         now: float | None = None) -> list[str]:
    """Remove stale temp files, then least recently used entries until the cache fits its bound;
    returns the names of the entries removed, then the paths of the temp files."""
    limit = max_cache_bytes() if max_bytes is None else max_bytes
    now = time.time() if now is None else now
    temps = remove_stale_temps(Path(root), now=now)
    entries = cache_entries(Path(root))
    busy = {e.name for e in entries if e.lock is not None and _in_use(e)}
    chosen = [e for e in choose_evictions(entries, limit, now, frozenset(keep) | busy) if _remove(e)]
    _remove_empty_mirror_folders(Path(root), now)
    left = sum(e.size for e in entries) - sum(e.size for e in chosen)
    if chosen:
        log.info("cache %s: removed %d least recently used entries (%.1f MiB); %.1f MiB left, bound %.1f MiB",
                 root, len(chosen), sum(e.size for e in chosen) / 2**20, left / 2**20, limit / 2**20)
    if left > limit:
        log.warning("cache %s holds %.1f MiB, over its bound of %.1f MiB (%s): the rest was used within the "
                    "last %.0f minutes or is open", root, left / 2**20, limit / 2**20, MAX_GB_ENV,
                    RECENT_USE_S / 60)
    return [*(e.name for e in chosen), *temps]
