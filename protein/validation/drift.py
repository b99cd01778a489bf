"""Label drift that knows sample size: pure numpy over counts, no GX.

A dataset's label profile is 14 shares: the share of images carrying each of the 10 classes and
the share with 1, 2, 3 or 4+ labels. Each share is compared with the reference's by a two-
proportion z-test that uses both sample sizes (pooled variance, continuity correction), and the
14 p-values are Holm-corrected so that the chance of any false alarm on an undrifted sample stays
at or below `alpha`. A significant cell is flagged only if it also moved by a large enough effect:
`min_relative_change` of its reference share for rare cells, `min_absolute_change` (in share
points) for common ones - whichever is smaller, so the relative floor governs below a share of
min_absolute_change / min_relative_change (20 % with the defaults) and the absolute rule above it.
A rare class halving (5.4 % -> 2.7 %) is a 50 % relative change and is caught, where a fixed +-5
point tolerance never would; Nucleoplasm 47 % -> 38 % is 9 points and is caught, where a 25 %
relative floor (11.8 points) never would; a 0.3-point wobble that a million rows make
"significant" is not.

Image statistics (per-channel mean, std and saturated fraction of each image, from the decode
pass) are compared the same way: the mean of a statistic over the images against the reference's,
a z-test with both sample sizes, Bonferroni over the statistics, and a relative floor.

Everything takes arrays with leading batch dimensions, so the contract tests can score thousands
of random subsamples in one call.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from protein.labels import LABELS, NUM_CLASSES

LABELS_PER_IMAGE_BUCKETS = ("1", "2", "3", "4+")
CELLS = tuple(f"class {i}" for i in range(NUM_CLASSES)) + tuple(
    f"{b} labels per image" for b in LABELS_PER_IMAGE_BUCKETS)
CELL_NAMES = tuple(LABELS) + tuple(f"{b} labels per image" for b in LABELS_PER_IMAGE_BUCKETS)

# Real train.csv statistics from shared/data/README.md (19,236 images).
_REAL_ROWS = 19_236
_REAL_CLASS_COUNTS = (2088, 1752, 2542, 1977, 9066, 1109, 5711, 2629, 1037, 1278)
_REAL_LABELS_PER_IMAGE = {"1": 10_639, "2": 7_299, "3": 1_240, "4+": 58}
REFERENCE_PROFILE: dict[str, Any] = {
    "n": _REAL_ROWS,
    "class_share": [round(c / _REAL_ROWS, 6) for c in _REAL_CLASS_COUNTS],
    "labels_per_image_share": {k: round(v / _REAL_ROWS, 6) for k, v in _REAL_LABELS_PER_IMAGE.items()},
    "source": "real train.csv statistics (shared/data/README.md)",
}


def _bucket(count: int) -> str:
    return "4+" if count >= 4 else str(count)


def profile_labels(label_sets: list[frozenset[int]]) -> dict:
    """Share of images carrying each class, and share of images with 1, 2, 3, 4+ labels."""
    n = len(label_sets)
    class_counts = [0] * NUM_CLASSES
    per_image = dict.fromkeys(LABELS_PER_IMAGE_BUCKETS, 0)
    for label_set in label_sets:
        for class_id in label_set:
            class_counts[class_id] += 1
        per_image[_bucket(len(label_set))] += 1
    return {
        "n": n,
        "class_share": [round(c / n, 6) if n else 0.0 for c in class_counts],
        "labels_per_image_share": {k: round(v / n, 6) if n else 0.0 for k, v in per_image.items()},
    }


def profile_hash(profile: dict) -> str:
    """Content hash of a profile's numbers: what a validation cache key and a report record."""
    numbers = {"n": profile.get("n"), "class_share": profile["class_share"],
               "labels_per_image_share": profile["labels_per_image_share"]}
    # What the new-rows window and image-statistics drift compare with, when the profile has it
    # (absent keys leave the hashes of older profiles as they were).
    for key in PIXEL_PROFILE_KEYS:
        if profile.get(key) is not None:
            numbers[key] = profile[key]
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]


def check_profile(profile: Any, where: str) -> dict:
    """A usable reference profile, or ValueError saying what is wrong with it."""
    if not isinstance(profile, dict):
        raise ValueError(f"{where}: a profile is a JSON object, got {type(profile).__name__}")
    shares = profile.get("class_share")
    per_image = profile.get("labels_per_image_share")
    if not isinstance(shares, list) or len(shares) != NUM_CLASSES or not all(_is_share(s) for s in shares):
        raise ValueError(f"{where}: class_share must be {NUM_CLASSES} numbers between 0 and 1")
    if not isinstance(per_image, dict) or set(per_image) != set(LABELS_PER_IMAGE_BUCKETS) or not all(
        _is_share(v) for v in per_image.values()
    ):
        raise ValueError(f"{where}: labels_per_image_share needs keys {', '.join(LABELS_PER_IMAGE_BUCKETS)}")
    n = profile.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: n (the number of images profiled) must be a positive integer")
    hashes = profile.get("row_hashes")
    if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)):
        raise ValueError(f"{where}: row_hashes must be a list of hex strings")
    stats = profile.get("image_statistics")
    if stats is not None and not (isinstance(stats, dict) and all(
            isinstance(v, dict) and {"n", "mean", "std"} <= set(v) for v in stats.values())):
        raise ValueError(f"{where}: image_statistics must map each statistic to its n, mean and std")
    return profile


def _is_share(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def profile_shares(profile: dict) -> np.ndarray:
    """(14,) shares in CELLS order."""
    buckets = [profile["labels_per_image_share"][b] for b in LABELS_PER_IMAGE_BUCKETS]
    return np.array([*profile["class_share"], *buckets], dtype=float)


def indicator_matrix(label_sets: list[frozenset[int]]) -> np.ndarray:
    """(n, 14) 0/1: which cells each image counts in. Summing chosen rows gives a sample's counts."""
    out = np.zeros((len(label_sets), len(CELLS)), dtype=np.int32)
    for row, label_set in enumerate(label_sets):
        for class_id in label_set:
            out[row, class_id] = 1
        out[row, NUM_CLASSES + LABELS_PER_IMAGE_BUCKETS.index(_bucket(len(label_set)))] = 1
    return out


@dataclass(frozen=True)
class DriftResult:
    """Per cell (last axis = CELLS): z statistic, Holm-adjusted p-value, relative change, flag."""

    z: np.ndarray
    p_adjusted: np.ndarray
    relative_change: np.ndarray
    flagged: np.ndarray

    @property
    def any_flagged(self) -> np.ndarray:
        return self.flagged.any(axis=-1)


_normal = NormalDist()


def _two_sided_p(z: np.ndarray) -> np.ndarray:
    # erfc keeps precision far in the tail, where 1 - cdf would round to 0.
    erfc = np.vectorize(math.erfc, otypes=[float])
    return erfc(np.abs(z) / math.sqrt(2.0))


def drift_test(
    ref_shares: np.ndarray, ref_n: int, counts: np.ndarray, n: np.ndarray | int,
    alpha: float, min_relative_change: float, min_absolute_change: float = 0.05,
) -> DriftResult:
    """Compare sample counts (..., 14) of n images with reference shares (14,) of ref_n images."""
    counts = np.asarray(counts, dtype=float)
    n_s = np.asarray(n, dtype=float)[..., None]
    p_r = np.asarray(ref_shares, dtype=float)
    p_s = counts / n_s
    x_r = np.round(p_r * ref_n)
    pooled = (counts + x_r) / (n_s + ref_n)
    inv = 1.0 / n_s + 1.0 / ref_n
    se = np.sqrt(pooled * (1.0 - pooled) * inv)
    gap = np.abs(p_s - p_r)
    # Yates' continuity correction: counts are integers, and without it a 4+ bucket holding 0.3 %
    # of images alarms on 3 images out of 200 far more often than alpha says.
    corrected = np.maximum(gap - 0.5 * inv, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, corrected / np.where(se > 0, se, 1.0), np.where(gap > 0, np.inf, 0.0))
        relative = np.where(p_r > 0, gap / np.where(p_r > 0, p_r, 1.0), np.where(gap > 0, np.inf, 0.0))
    p = _two_sided_p(z)
    # Holm step-down: sort ascending, multiply the k-th smallest by (m - k), keep the running max.
    m = p.shape[-1]
    order = np.argsort(p, axis=-1)
    sorted_p = np.take_along_axis(p, order, axis=-1) * (m - np.arange(m))
    adjusted_sorted = np.minimum(np.maximum.accumulate(sorted_p, axis=-1), 1.0)
    adjusted = np.empty_like(adjusted_sorted)
    np.put_along_axis(adjusted, order, adjusted_sorted, axis=-1)
    # The effect a cell must show: relative for rare cells, absolute for common ones (the smaller).
    floor = np.minimum(min_relative_change * p_r, min_absolute_change)
    flagged = (adjusted <= alpha) & (gap >= floor - 1e-12)
    return DriftResult(z=z, p_adjusted=adjusted, relative_change=relative, flagged=flagged)


def compare_counts(counts: np.ndarray, n: int, ref_shares: np.ndarray, ref_n: int, alpha: float,
                   min_relative_change: float, min_absolute_change: float) -> list[dict]:
    """One record per cell: reference and current share, adjusted p, drifted (what Data Docs show)."""
    counts = np.asarray(counts, dtype=float)
    shares = counts / n if n else np.zeros_like(counts)
    ref = np.asarray(ref_shares, dtype=float)
    result = drift_test(ref, ref_n, counts, n, alpha, min_relative_change, min_absolute_change)
    records = []
    for i, cell in enumerate(CELLS):
        records.append({
            "check": cell, "class": i if i < NUM_CLASSES else None, "name": CELL_NAMES[i],
            "reference": float(ref[i]), "observed": float(shares[i]),
            "shift": round(float(shares[i] - ref[i]), 6),
            "relative_change": None if math.isinf(result.relative_change[i]) else round(float(
                result.relative_change[i]), 4),
            "z": None if math.isinf(result.z[i]) else round(float(result.z[i]), 3),
            "p_adjusted": float(f"{result.p_adjusted[i]:.3g}"),
            "drifted": bool(result.flagged[i]),
        })
    return records


def label_counts(labels: list[str]) -> np.ndarray:
    """(14,) cell counts of canonical label strings ("4 6")."""
    sets = [frozenset(int(c) for c in label.split()) for label in labels]
    return indicator_matrix(sets).sum(axis=0) if sets else np.zeros(len(CELLS), dtype=np.int64)


def canonical_label(label_set: frozenset[int]) -> str:
    return " ".join(str(c) for c in sorted(label_set))


def row_hash(image_id: str, label_set: frozenset[int], content_sha256: str) -> str:
    """A labelled image's identity for "rows added since the reference": its id, its labels and its
    decoded pixels. A relabelled or re-imaged row counts as new."""
    text = f"{image_id}|{canonical_label(label_set)}|{content_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()[:ROW_HASH_CHARS]


ROW_HASH_CHARS = 16
# Parts of a profile only a full decode gives: rows by content, and per-image intensity statistics.
PIXEL_PROFILE_KEYS = ("row_hashes", "image_statistics")
# Per-image intensity statistics: the decode pass computes them from each band's histogram.
CHANNELS = ("red", "green", "blue")
IMAGE_STATISTICS = tuple(f"{c}_{s}" for c in CHANNELS for s in ("mean", "std", "saturated"))


def moments(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {"n": int(values.size), "mean": float(values.mean()) if values.size else 0.0,
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}


def image_statistic_test(mean: float, std: float, n: int, ref_mean: float, ref_std: float, ref_n: int,
                         tests: int, alpha: float, min_relative_change: float) -> dict[str, Any]:
    """Is the mean of one per-image statistic outside the reference's bounds? A two-sample z-test
    (Bonferroni over `tests` statistics) and a relative floor; the bound is what it takes to flag."""
    se = math.sqrt(ref_std**2 / max(ref_n, 1) + std**2 / max(n, 1))
    gap = abs(mean - ref_mean)
    z = gap / se if se > 0 else (math.inf if gap > 0 else 0.0)
    p = min(1.0, math.erfc(z / math.sqrt(2.0)) * tests)
    relative = gap / abs(ref_mean) if ref_mean else (math.inf if gap > 0 else 0.0)
    z_needed = _normal.inv_cdf(1 - alpha / (2 * tests))
    half_width = max(z_needed * se, min_relative_change * abs(ref_mean))
    return {"mean": mean, "reference_mean": ref_mean, "n": n, "reference_n": ref_n,
            "lower": ref_mean - half_width, "upper": ref_mean + half_width,
            "relative_change": None if math.isinf(relative) else round(relative, 4),
            "p_adjusted": float(f"{p:.3g}"), "drifted": bool(p <= alpha and relative >= min_relative_change)}


def critical_z(alpha: float, cells: int = len(CELLS)) -> float:
    """|z| a single cell needs before Holm can flag anything (for the docs and messages)."""
    return _normal.inv_cdf(1 - alpha / (2 * cells))
