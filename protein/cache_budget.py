"""A size bound on a host's cache folder, kept automatically: least recently used entries go first.

A CPU host that runs the nightly for a month downloads a dataset per push, a model per gate and
decodes a split per image size; without a bound it fills its disk. After every write into the
cache (a decoded split, a downloaded model, a fetched dataset folder or zip) the writer calls
`enforce_cache_budget`, which removes whole entries, oldest last use first, until the cache is
within `$PROTEIN_CACHE_MAX_GB` (default `DEFAULT_MAX_GB`).

What counts as an entry, under the cache root:
- a decoded split: `<name>.npy` + `<name>.json` (last use: the .json's mtime, touched on every hit);
  its `<name>.lock` stays, so two processes always lock the same file;
- a downloaded model version: `models/<version>/` (last use: the folder's mtime, touched on use);
- a dataset file or zip fetched from S3: `datasets/objects/**`, `datasets/zips/*` (last use: mtime,
  touched on read).

Never removed, whatever the bound: an entry used within the last `RECENT_USE_S` (a run on this
host may be reading it right now; a file unlinked under an open descriptor stays readable on
POSIX, but a process that has yet to open it would miss it), and the entry the caller just wrote.
When only such entries are left and the cache is still over the bound, a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_GB_ENV = "PROTEIN_CACHE_MAX_GB"
DEFAULT_MAX_GB = 50.0
RECENT_USE_S = 3600.0


@dataclass(frozen=True)
class CacheEntry:
    """One removable unit of the cache: its files, their total size and when it was last used."""

    name: str
    paths: tuple[Path, ...]
    size: int
    last_used: float


def max_cache_bytes() -> int:
    """The bound in bytes: $PROTEIN_CACHE_MAX_GB (a positive number of GiB), else DEFAULT_MAX_GB."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{MAX_GB_ENV}={text!r}: expected a positive number of GiB") from None
    if not value > 0:
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
        yield CacheEntry(f"images/{meta.stem}", (array, meta), size, meta_stat.st_mtime)


def _model_entries(root: Path) -> Iterator[CacheEntry]:
    models = root / "models"
    if not models.is_dir():
        return
    for folder in models.iterdir():
        st = _stat(folder)
        if st is not None and folder.is_dir():
            yield CacheEntry(f"models/{folder.name}", (folder,), _tree_size(folder), st.st_mtime)


def _dataset_entries(root: Path) -> Iterator[CacheEntry]:
    for sub in ("objects", "zips"):
        folder = root / "datasets" / sub
        if not folder.is_dir():
            continue
        for dirpath, _, filenames in os.walk(folder):
            for filename in filenames:
                if filename.startswith("."):  # a download in progress (temp file) or a partial .part
                    continue
                path = Path(dirpath) / filename
                st = _stat(path)
                if st is not None:
                    yield CacheEntry(f"datasets/{path.relative_to(folder.parent)}", (path,), st.st_size, st.st_mtime)


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every removable entry under the cache root (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [*_image_entries(root), *_model_entries(root), *_dataset_entries(root)]


def touch(path: Path) -> None:
    """Record a use (mtime), so the entry is the last the budget removes."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _remove(entry: CacheEntry) -> None:
    for path in entry.paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def enforce_cache_budget(root: Path, keep: Iterable[str] = (), max_bytes: int | None = None,
                         now: float | None = None) -> list[str]:
    """Remove least recently used entries until the cache fits its bound; returns their names."""
    limit = max_cache_bytes() if max_bytes is None else max_bytes
    entries = cache_entries(Path(root))
    now = time.time() if now is None else now
    chosen = choose_evictions(entries, limit, now, frozenset(keep))
    for entry in chosen:
        _remove(entry)
    left = sum(e.size for e in entries) - sum(e.size for e in chosen)
    if chosen:
        log.info("cache %s: removed %d least recently used entries (%.1f MiB); %.1f MiB left, bound %.1f MiB",
                 root, len(chosen), sum(e.size for e in chosen) / 2**20, left / 2**20, limit / 2**20)
    if left > limit:
        log.warning("cache %s holds %.1f MiB, over its bound of %.1f MiB (%s): the rest was used within the "
                    "last %.0f minutes", root, left / 2**20, limit / 2**20, MAX_GB_ENV, RECENT_USE_S / 60)
    return [e.name for e in chosen]
