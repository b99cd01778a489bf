"""Label drift that knows sample size: pure numpy over counts, no GX.

A dataset's label profile is 14 shares: the share of images carrying each of the 10 classes and
the share with 1, 2, 3 or 4+ labels. Each share is compared with the reference's by a two-
proportion z-test that uses both sample sizes (pooled variance, continuity correction), and the
14 p-values are Holm-corrected so that the chance of any false alarm on an undrifted sample stays
at or below `alpha`. A significant cell is flagged only if it also moved by at least
`min_relative_change` of its reference share: a rare class halving (5.4 % -> 2.7 %) is a 50 %
relative change and is caught, where a fixed +-5 point tolerance never would; a 0.3-point wobble
that a million rows make "significant" is not.

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
    alpha: float, min_relative_change: float,
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
    flagged = (adjusted <= alpha) & (relative >= min_relative_change)
    return DriftResult(z=z, p_adjusted=adjusted, relative_change=relative, flagged=flagged)


def compare_profiles(profile: dict, reference: dict, alpha: float, min_relative_change: float) -> list[dict]:
    """One record per cell, for the distribution table and Data Docs."""
    shares = profile_shares(profile)
    counts = np.round(shares * profile["n"])
    result = drift_test(profile_shares(reference), int(reference["n"]), counts, profile["n"], alpha,
                        min_relative_change)
    ref = profile_shares(reference)
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


def critical_z(alpha: float, cells: int = len(CELLS)) -> float:
    """|z| a single cell needs before Holm can flag anything (for the docs and messages)."""
    return _normal.inv_cdf(1 - alpha / (2 * cells))
