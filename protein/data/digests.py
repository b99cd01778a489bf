"""Content digests of dataset files, and the local cache that keeps re-fingerprinting cheap.

The fingerprint's per-file digest is MD5 (with the size) because that is what S3 already reports
for every object uploaded in one part (its ETag), so an S3 copy is fingerprinted from a listing,
with no download, and gets the same fingerprint as the local folder it came from. MD5 is used to
tell versions of the data apart, not as a defence against someone with write access to the data
(who could change it anyway); the store's own SHA-256 checks guard integrity.

A folder is fingerprinted by reading every byte. The hash cache remembers each file's MD5 keyed by
(size, mtime, ctime, inode): ctime cannot be set back by user tools and changes with every write,
so a cached digest is reused only for the very file that was hashed; a copy on another host, or a
file rewritten in place, is hashed again. The cache only saves time: the result is the same with
or without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protein.atomic import write_bytes_atomic
from protein.cache_budget import touch
from protein.locations import default_cache_dir

log = logging.getLogger(__name__)

HASH_CACHE_VERSION = 1
# hashlib releases the GIL on large buffers, so a few threads overlap hashing with disk reads.
HASH_THREADS = 4


def data_cache_dir(cache_dir: Path | None = None) -> Path:
    """<cache>/datasets: downloads, hash caches and locks of the data layer. The cache root is the
    one the image cache uses (--cache-dir, else `protein.locations.default_cache_dir`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "datasets"


@dataclass(frozen=True)
class FileDigest:
    size: int
    md5: str


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def hash_file(path: Path, algorithm: str = "md5") -> tuple[int, str]:
    """(size, hex digest) of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def md5_file(path: Path) -> FileDigest:
    return FileDigest(*hash_file(path, "md5"))


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class HashCache:
    """One JSON file of {name: [size, mtime_ns, ctime_ns, inode, hex digest]}, rewritten atomically.
    MD5 for fingerprints; SHA-256 (a cache file of its own) for the content objects a push names."""

    def __init__(self, path: Path, algorithm: str = "md5") -> None:
        self.path = path
        self.algorithm = algorithm

    def _load(self) -> dict[str, list]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("version") != HASH_CACHE_VERSION:
            return {}
        if doc.get("algorithm", "md5") != self.algorithm:
            return {}
        entries = doc.get("entries")
        return entries if isinstance(entries, dict) else {}

    def digests(
        self, files: dict[str, Path], stats: dict[str, os.stat_result] | None = None
    ) -> dict[str, FileDigest]:
        """Size and MD5 of every file (name -> path); see `hexdigests`."""
        if self.algorithm != "md5":
            raise ValueError(f"{self.path}: a {self.algorithm} cache holds no MD5 digests")
        return {name: FileDigest(*pair) for name, pair in self.hexdigests(files, stats).items()}

    def hexdigests(
        self, files: dict[str, Path], stats: dict[str, os.stat_result] | None = None
    ) -> dict[str, tuple[int, str]]:
        """(size, hex digest) of every file (name -> path), hashing only those whose identity changed.
        `stats` may hold stat results the caller already has (from os.scandir), saving a syscall per file."""
        cached = self._load()
        out: dict[str, tuple[int, str]] = {}
        misses: list[tuple[str, Path, list[int]]] = []
        stats = stats or {}
        for name, path in files.items():
            identity = _identity(stats[name] if name in stats else os.stat(path))
            entry = cached.get(name)
            if isinstance(entry, list) and len(entry) == 5 and entry[:4] == identity:
                out[name] = (identity[0], str(entry[4]))
            else:
                misses.append((name, path, identity))
        if not misses:
            touch(self.path)  # a hit is a use: the cache's size bound evicts least recently used first, by mtime
        else:
            with ThreadPoolExecutor(HASH_THREADS) as pool:
                hashed = list(pool.map(lambda m: hash_file(m[1], self.algorithm), misses))
            for (name, path, identity), digest in zip(misses, hashed, strict=True):
                # A file rewritten while we hashed it is not remembered: its identity changed under us.
                if _identity(os.stat(path)) == identity and digest[0] == identity[0]:
                    cached[name] = [*identity, digest[1]]
                out[name] = digest
            self._save({name: cached[name] for name in files if name in cached})
            log.info("hashed %d of %d files (%d from the hash cache %s)", len(misses), len(files),
                     len(files) - len(misses), self.path)
        return out

    def _save(self, entries: dict[str, list]) -> None:
        try:
            doc = {"version": HASH_CACHE_VERSION, "algorithm": self.algorithm, "entries": entries}
            write_bytes_atomic(self.path, json.dumps(doc).encode(), durable=False)
        except OSError as exc:  # a read-only cache only costs speed
            log.warning("could not write the hash cache %s: %s", self.path, exc)


def cache_file_for(cache_root: Path, kind: str, parts: Iterable[object]) -> Path:
    key = hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return cache_root / "hashes" / f"{kind}-{key}.json"
