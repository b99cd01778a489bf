"""Decode-once image cache.

Decoding a 512x512 PNG costs milliseconds; doing it every epoch starves the model. One pass
decodes and resizes every image of a split to the training resolution and stores the uint8
pixels in one memory-mapped .npy file, keyed by the dataset fingerprint and the size. Later
epochs, runs and prediction slice it. A changed dataset has a different fingerprint, so a
stale cache is never read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein.atomic import atomic_path, write_text_atomic
from protein.data import TEST_DIR, TRAIN_DIR, CompetitionData, DatasetSource, fingerprint, load_image
from protein.storage import Store

log = logging.getLogger(__name__)

CHUNK = 64  # images per worker task: large enough to amortise IPC, small enough to balance


@dataclass(frozen=True)
class CacheKey:
    fingerprint: str
    split: str
    image_size: int

    @property
    def name(self) -> str:
        return f"{self.fingerprint}-{self.split}-{self.image_size}px"


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
    # 'spawn' would re-import torch in every worker; fork is safe here because workers
    # only touch PIL and numpy.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
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


class ImageCache:
    """A folder of decoded splits: <key>.npy (N, S, S, 3) uint8 plus <key>.json (ids)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: CacheKey) -> tuple[Path, Path]:
        return self.root / f"{key.name}.npy", self.root / f"{key.name}.json"

    def load(self, key: CacheKey, image_ids: list[str]) -> np.ndarray | None:
        array_path, meta_path = self.paths(key)
        if not (array_path.exists() and meta_path.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("ids") != image_ids:
            return None
        array = np.load(array_path, mmap_mode="r")
        if array.shape != (len(image_ids), key.image_size, key.image_size, 3):
            return None
        return array

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
        if shared is not None and self.pull(shared, key):
            cached = self.load(key, image_ids)
            if cached is not None:
                log.info("image cache pulled from %s: %s", shared.uri, key.name)
                return cached
        folder = TRAIN_DIR if split == "train" else TEST_DIR
        rels = [f"{folder}/{i}.png" for i in image_ids]
        self.root.mkdir(parents=True, exist_ok=True)
        array_path, meta_path = self.paths(key)
        with atomic_path(array_path) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(rels), image_size, image_size, 3)
            )
            decode_all(data.source, rels, image_size, out, workers or default_workers(), progress)
            out.flush()
            del out
        write_text_atomic(meta_path, json.dumps({"ids": image_ids, "key": key.__dict__}))
        log.info("image cache built: %s (%d images)", key.name, len(image_ids))
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

    def pull(self, store: Store, key: CacheKey) -> bool:
        array_key, meta_key = self.store_keys(key)
        if not store.exists(meta_key):
            return False
        array_path, meta_path = self.paths(key)
        store.get_file(array_key, array_path)
        store.get_file(meta_key, meta_path)
        return True
