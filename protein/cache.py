"""Decode-once image cache.

Decoding a 512x512 PNG costs milliseconds; doing it every epoch starves the model. One pass
decodes and resizes every image of a split to the training resolution and stores the uint8
pixels in one memory-mapped .npy file, keyed by the dataset fingerprint, the size, the
preprocessing version and the Pillow version (a new resize or a new decoder gives new pixels).
Later epochs, runs and prediction slice it. A changed dataset has a different fingerprint, so a
stale cache is never read.

Two processes that need the same entry do not both decode it: the builder holds an exclusive
lock on <key>.lock and the second one finds the finished entry when it gets the lock; lock files
are never removed, so two processes can never hold locks on two different files of one name. An
entry that cannot be read (truncated by a full disk, corrupted, even with its length unchanged:
its SHA-256 is recorded beside its ids and checked on every load, about a second per GB) is
rebuilt, not raised. The cache stays within its size bound (protein.cache_budget, least recently
used first) after every build; `gc` also removes entries unused for N days, and the temp files of
builds that were killed (cache_budget.remove_stale_temps).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL

from protein.atomic import atomic_path, write_text_atomic
from protein.cache_budget import (
    MAX_GB_ENV,
    STALE_TEMP_S,
    enforce_cache_budget,
    exclusive_now,
    max_cache_bytes,
    remove_stale_temps,
    touch,
)
from protein.data import TEST_DIR, TRAIN_DIR, CompetitionData, DatasetSource, fingerprint, load_image
from protein.errors import IntegrityError, NotFound, ProteinError
from protein.locations import CACHE_DIR_ENV
from protein.pools import ignore_interrupts, pool_context
from protein.storage import Store
from protein.storage.base import sha256_file

log = logging.getLogger(__name__)

CHUNK = 64  # images per worker task: large enough to amortise IPC, small enough to balance
# Bump when load_image's output changes for the same bytes (resize filter, colour handling).
PREPROCESS_VERSION = 1
SUFFIXES = (".npy", ".json", ".lock")


# The oldest age a cache gc takes: a century (timedelta cannot hold a billion days).
MAX_CACHE_AGE_DAYS = 36500.0


def check_cache_age(older_than_days: float) -> None:
    """ValueError unless the age is a finite number of days in [0, MAX_CACHE_AGE_DAYS]: NaN fails
    every comparison and a negative age puts the cutoff in the future, so either would remove every
    entry, in use or not."""
    if not (math.isfinite(older_than_days) and 0 <= older_than_days <= MAX_CACHE_AGE_DAYS):
        raise ValueError(f"--older-than-days must be a number of days from 0 to {MAX_CACHE_AGE_DAYS:g}, "
                         f"got {older_than_days:g}")


@dataclass(frozen=True)
class CacheKey:
    fingerprint: str
    split: str
    image_size: int
    preprocess: int = PREPROCESS_VERSION
    pillow: str = field(default_factory=lambda: PIL.__version__)

    @property
    def name(self) -> str:
        return f"{self.fingerprint}-{self.split}-{self.image_size}px-p{self.preprocess}-pil{self.pillow}"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_chunk(source: DatasetSource, rels: list[str], image_size: int) -> np.ndarray:
    out = np.empty((len(rels), image_size, image_size, 3), dtype=np.uint8)
    for i, rel in enumerate(rels):
        out[i] = load_image(source.read_bytes(rel), source.locate(rel), image_size)
    return out


def decode_all(
    source: DatasetSource,
    rels: list[str],
    image_size: int,
    out: np.ndarray,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decode rels into out[i]; corrupt images raise DataError naming the file."""
    chunks = [rels[i : i + CHUNK] for i in range(0, len(rels), CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        for start, chunk in zip(range(0, len(rels), CHUNK), chunks, strict=True):
            out[start : start + len(chunk)] = _decode_chunk(source, chunk, image_size)
            if progress:
                progress(len(chunk))
        return
    # Never fork: the caller may be a training process with torch's or Prefect's threads running,
    # whose locks a forked child inherits in whatever state they were (protein.pools). Workers ignore
    # Ctrl-C: on the parent's KeyboardInterrupt below, each finishes the one chunk it holds.
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(), initializer=ignore_interrupts) as pool:
        futures = [pool.submit(_decode_chunk, source, chunk, image_size) for chunk in chunks]
        start = 0
        try:
            for future, chunk in zip(futures, chunks, strict=True):
                out[start : start + len(chunk)] = future.result()
                start += len(chunk)
                if progress:
                    progress(len(chunk))
        except BaseException:
            # The first corrupt image decides the outcome: do not decode the rest first.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def reserve_disk_space(tmp: Path, entry: Path) -> None:
    """Allocate every block of the sparse temp file `tmp` now, or raise ProteinError naming `entry`.

    A memory-mapped write that finds the disk full is not an OSError but SIGBUS: the process dies
    with "Bus error" before any handler or cleanup runs, and its temp file (as large as the split)
    fills the disk until the stale-temp rule removes it an hour later. Reserved blocks cannot run out."""
    size = tmp.stat().st_size
    try:
        fallocate = os.posix_fallocate  # Linux and the BSDs; macOS has none
    except AttributeError:
        fallocate = None
    try:
        if fallocate is not None:
            with open(tmp, "rb+") as handle:
                fallocate(handle.fileno(), 0, size)
            return
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _no_room(entry, size) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    # A filesystem without fallocate: the free space is the best check left (racy, but it catches
    # a disk that is already full).
    if shutil.disk_usage(tmp.parent).free < size - tmp.stat().st_blocks * 512:
        raise _no_room(entry, size)


def _no_room(entry: Path, size: int) -> ProteinError:
    return ProteinError(f"{entry}: no space left on device for this decoded image cache entry ({size:,} bytes "
                        f"needed): free space there (`protein cache gc`), keep ${MAX_GB_ENV} (the cache's size "
                        f"bound) below what that disk holds, or point ${CACHE_DIR_ENV} or --cache-dir at a larger one")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another process since it was listed
        return None


class ImageCache:
    """A folder of decoded splits: <key>.npy (N, S, S, 3) uint8 plus <key>.json (ids)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: CacheKey) -> tuple[Path, Path]:
        return self.root / f"{key.name}.npy", self.root / f"{key.name}.json"

    def load(self, key: CacheKey, image_ids: list[str]) -> np.ndarray | None:
        """The entry, or None if it is missing, for other ids, or unreadable (then it is rebuilt)."""
        array_path, meta_path = self.paths(key)
        if not (array_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("ids") != image_ids:
                return None
            if meta.get("sha256") != sha256_file(array_path):
                log.warning("image cache %s does not match its recorded SHA-256 (corrupted or from an older "
                            "version); rebuilding it", key.name)
                return None
            array = np.load(array_path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:  # truncated or corrupt: numpy and json say ValueError
            log.warning("image cache %s is unreadable, rebuilding it: %s", key.name, exc)
            return None
        if array.shape != (len(image_ids), key.image_size, key.image_size, 3) or array.dtype != np.uint8:
            log.warning("image cache %s has shape %s, expected %s; rebuilding it", key.name, array.shape,
                        (len(image_ids), key.image_size, key.image_size, 3))
            return None
        touch(meta_path)  # last use, for gc and the size bound
        return array

    def lock(self, key: CacheKey) -> contextlib.AbstractContextManager[None]:
        """Exclusive per entry across processes on this host (flock is released if a holder dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.lock_by_name(key.name)

    def gc(self, older_than_days: float, dry_run: bool = False) -> list[str]:
        """Remove entries not used for older_than_days, and temp files of writers that died (under the
        root, datasets/, the validation mirror and models/; never one written within the hour or whose
        writer holds its lock); returns
        their names. Lock files stay: a process waiting on one must find the entry's state through
        that same file."""
        check_cache_age(older_than_days)
        if not self.root.is_dir():
            return []
        now = time.time()
        cutoff = now - older_than_days * 86400
        removed = []
        for meta_path in sorted(self.root.glob("*.json")):
            name = meta_path.stem
            if self._last_used(name) >= cutoff:
                continue
            if dry_run:
                removed.append(name)
                continue
            with self.lock_by_name(name):
                # Re-read under the lock: a build or a load may have renewed the entry while gc waited.
                if self._last_used(name) >= cutoff:
                    continue
                removed.append(name)
                for suffix in (".npy", ".json"):
                    (self.root / f"{name}{suffix}").unlink(missing_ok=True)
        # An .npy without its ids file is a build that died, or one still running between moving the
        # array into place and writing its ids: remove it once it is old too, never while its lock is held.
        for array_path in sorted(self.root.glob("*.npy")):
            name = array_path.stem
            if self._orphan_last_used(name) >= cutoff:
                continue
            with exclusive_now(self.root / f"{name}.lock") as free:
                if not free or self._orphan_last_used(name) >= cutoff:
                    continue
                removed.append(name)
                if not dry_run:
                    array_path.unlink(missing_ok=True)
        return removed + remove_stale_temps(self.root, older_than_days * 86400, now, dry_run)

    def _last_used(self, name: str) -> float:
        """The entry's last use (its newer file's mtime); infinite once its ids file is gone, so this
        entry's gc leaves what is left to the orphans' rule."""
        meta_used = _mtime(self.root / f"{name}.json")
        return math.inf if meta_used is None else max(meta_used, _mtime(self.root / f"{name}.npy") or 0.0)

    def _orphan_last_used(self, name: str) -> float:
        """The array's mtime while it has no ids file; infinite once it has one (a whole entry) or is gone."""
        if (self.root / f"{name}.json").exists():
            return math.inf
        array_used = _mtime(self.root / f"{name}.npy")
        return math.inf if array_used is None else array_used

    @contextlib.contextmanager
    def lock_by_name(self, name: str) -> Iterator[None]:
        with open(self.root / f"{name}.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def build(
        self,
        data: CompetitionData,
        split: str,
        image_size: int,
        workers: int | None = None,
        progress: Callable[[int], None] | None = None,
        key: CacheKey | None = None,
        shared: Store | None = None,
    ) -> np.ndarray:
        """Return the split's decoded images, decoding them only if no valid cache exists.

        With a `shared` object store, a cache another machine built (e.g. a CPU worker for a
        GPU worker) is pulled from `cache/<key>.npy` instead of decoding again, and a cache
        built here is pushed there. The store verifies each object's SHA-256 on the way.
        """
        image_ids = data.train_ids if split == "train" else data.test_ids
        key = key or CacheKey(fingerprint(data.source), split, image_size)
        cached = self.load(key, image_ids)
        if cached is not None:
            log.info("image cache hit: %s (%d images)", key.name, len(image_ids))
            return cached
        with self.lock(key):
            # Whoever held the lock before us may have just built it.
            cached = self.load(key, image_ids)
            if cached is not None:
                log.info("image cache built by another process: %s", key.name)
                return cached
            return self._build_locked(data, split, image_ids, key, workers, progress, shared)

    def _build_locked(
        self,
        data: CompetitionData,
        split: str,
        image_ids: list[str],
        key: CacheKey,
        workers: int | None,
        progress: Callable[[int], None] | None,
        shared: Store | None,
    ) -> np.ndarray:
        max_cache_bytes()  # a bad bound fails now, not after the decode it would have bounded
        image_size = key.image_size
        if shared is not None and self.pull(shared, key):
            cached = self.load(key, image_ids)
            if cached is not None:
                log.info("image cache pulled from %s: %s", shared.uri, key.name)
                enforce_cache_budget(self.root, keep=[f"images/{key.name}"])
                return cached
        folder = TRAIN_DIR if split == "train" else TEST_DIR
        rels = [f"{folder}/{i}.png" for i in image_ids]
        self.root.mkdir(parents=True, exist_ok=True)
        array_path, meta_path = self.paths(key)
        with atomic_path(array_path, durable=False) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(rels), image_size, image_size, 3)
            )
            # Before the first page is written: open_memmap only wrote the header and set the length.
            reserve_disk_space(tmp, array_path)
            decode_all(data.source, rels, image_size, out, workers or default_workers(), progress)
            out.flush()
            del out
        write_text_atomic(meta_path, json.dumps({"ids": image_ids, "key": key.__dict__,
                                                 "sha256": sha256_file(array_path),
                                                 "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}),
                          durable=False)
        log.info("image cache built: %s (%d images)", key.name, len(image_ids))
        enforce_cache_budget(self.root, keep=[f"images/{key.name}"])
        if shared is not None:
            self.push(shared, key)
        return np.load(array_path, mmap_mode="r")

    @staticmethod
    def store_keys(key: CacheKey) -> tuple[str, str]:
        return f"cache/{key.name}.npy", f"cache/{key.name}.json"

    def push(self, store: Store, key: CacheKey) -> None:
        array_key, meta_key = self.store_keys(key)
        array_path, meta_path = self.paths(key)
        store.put_file(array_key, array_path)
        # The ids file goes last: its presence marks a complete upload for pull().
        store.put_file(meta_key, meta_path)

    @staticmethod
    def gc_store(store: Store, older_than_days: float, dry_run: bool = False) -> list[str]:
        """Remove shared entries under cache/ pushed more than older_than_days ago (the store has no
        last-use time; a worker that needs a removed entry rebuilds and pushes it again), and arrays
        whose ids file never came (a push killed between the two uploads) once an hour old too.

        Ages are the store's own (its listing's last-modified, against its clock), never the ids
        file's `created`: a GPU host writes that file, and a date in the future would keep its entry
        for ever; nor is the file read, which a GPU host could make any size."""
        check_cache_age(older_than_days)
        now = store.clock()
        cutoff = now - older_than_days * 86400
        listed = {info.key: info.modified for info in store.list_info("cache/")}
        removed = []
        for key, modified in sorted(listed.items()):
            stem, suffix = key[len("cache/"):].rpartition(".")[::2]
            if suffix == "json":
                stale = modified < cutoff
            elif suffix == "npy" and f"cache/{stem}.json" not in listed:
                # A push uploads the array, then the ids file: an hour's grace for one still going.
                stale = modified < min(cutoff, now - STALE_TEMP_S)
            else:
                continue
            if not stale:
                continue
            removed.append(stem)
            if not dry_run:
                # The ids file first: without it pull() treats the entry as absent.
                store.delete(f"cache/{stem}.json")
                store.delete(f"cache/{stem}.npy")
        return removed

    def pull(self, store: Store, key: CacheKey) -> bool:
        """Download the shared entry; False if the store has none, so the caller decodes it here."""
        array_key, meta_key = self.store_keys(key)
        array_path, meta_path = self.paths(key)
        try:
            if not store.exists(meta_key):
                return False
            store.get_file(array_key, array_path)
            store.get_file(meta_key, meta_path)
        except (NotFound, IntegrityError) as exc:
            # `gc_store` may delete the entry between the check and the downloads, or the store refuses a
            # corrupt copy: a miss either way. Half a pair must not stay to be mistaken for an entry.
            log.warning("image cache %s could not be pulled from %s (%s); decoding it here", key.name, store.uri,
                        exc)
            array_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return False
        return True
