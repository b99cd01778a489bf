"""What every step starts from: the run id, the holdout split and the
decoded-image cache."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from protein.cache import CacheKey, ImageCache
from protein.config import TrainConfig
from protein.data import CompetitionData
from protein.errors import FingerprintMismatch
from protein.evaluation.gate import ids_digest
from protein.locations import default_cache_dir
from protein.split import iterative_stratified_folds, iterative_stratified_split
from protein.storage import Store


def new_run_id(data_fingerprint: str) -> str:
    """A run id of its own for a training started without one. The random part keeps two trainings
    of the same data started in the same second apart (folds trained in a loop): with the second and
    the data alone they shared a run id, and the second resumed the first's finished checkpoint and
    returned its model."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{data_fingerprint[:8]}-{secrets.token_hex(4)}"


def content_groups(data: CompetitionData) -> np.ndarray:
    """int64 (N,) per train row: the first row with the same image bytes (itself when unique). The
    split keeps such rows on one side: a push that adds a byte-identical copy of an image under a
    new id must not let a model train on the copy and be scored on the original."""
    digests = data.train_image_digests()
    first_row: dict[str, int] = {}
    groups = np.arange(len(data.train_ids), dtype=np.int64)
    for row, image_id in enumerate(data.train_ids):
        if (digest := digests.get(image_id)) is not None:
            groups[row] = first_row.setdefault(digest, row)
    return groups


def has_byte_identical_copies(data: CompetitionData) -> bool:
    """Whether two train images hold the same bytes: only then does the grouped split differ from
    the split made before grouping (`holdout_split`)."""
    digests = data.train_image_digests()
    return len(set(digests.values())) < len(digests)


def split_digest(data: CompetitionData, train_idx: np.ndarray, holdout_idx: np.ndarray) -> str:
    """sha256 naming a split by its train ids and its holdout ids: a checkpoint records it, so a
    resume goes on only on the rows its weights trained on."""
    train_ids = [data.train_ids[i] for i in train_idx]
    holdout_ids = [data.train_ids[i] for i in holdout_idx]
    return hashlib.sha256(f"{ids_digest(train_ids)}\n{ids_digest(holdout_ids)}".encode()).hexdigest()


def holdout_split(data: CompetitionData, holdout_fraction: float, seed: int, fold: int | None = None,
                  folds: int = 5, grouped: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The holdout is a pure function of (labels, image digests, fraction, seed) or, with a fold,
    of (labels, image digests, folds, seed, fold): a challenger and the champion evaluated with the
    same parameters see exactly the same images. fold is 1-based: fold k of K holds out the k-th
    part. Byte-identical images land on one side (`content_groups`); grouped=False rebuilds the
    split of versions made before that, which differs only where the data holds such copies."""
    groups = content_groups(data) if grouped else None
    if fold is None:
        return iterative_stratified_split(data.targets, holdout_fraction, seed, groups)
    fold_of = iterative_stratified_folds(data.targets, folds, seed, groups)
    return np.flatnonzero(fold_of != fold - 1).astype(np.int64), np.flatnonzero(fold_of == fold - 1).astype(np.int64)


def training_split(data: CompetitionData, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, holdout_idx) of a training run: a refit trains on every row."""
    if config.refit:
        return np.arange(len(data.train_ids), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return holdout_split(data, config.holdout_fraction, config.seed, config.fold, config.folds)


def load_split_images(
    data: CompetitionData,
    split: str,
    image_size: int,
    data_fingerprint: str,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    shared: Store | None = None,
) -> np.ndarray:
    """Decoded images of a split; the caller passes the fingerprint it already computed, which
    keys the cache, instead of stat-ing every image again."""
    key = CacheKey(data_fingerprint, split, image_size)
    return ImageCache(cache_dir or default_cache_dir()).build(data, split, image_size, workers, progress, key=key,
                                                              shared=shared)


def check_fingerprint(where: str, actual: str, expected: str | None, refusal: str = "refusing to train on it") -> None:
    """FingerprintMismatch when the data a run opened is not what it validated: a dataset named
    directly (a folder, an s3:// prefix) can change during the hours of a run, and its new rows and
    labels never passed validation. ``refusal`` says what is not done."""
    if expected is not None and expected.strip() and actual != expected.strip():
        raise FingerprintMismatch(
            f"{where}: data fingerprint {actual} differs from the expected {expected.strip()} (the data changed "
            f"since it was validated); {refusal}"
        )


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("f1_samples", "f1_micro", "f1_macro", "course_f_score") if k in metrics}
