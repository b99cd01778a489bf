"""Paired bootstrap of a gate metric over images: how much of a challenger's gain is noise.

Pure numpy. Each evaluation carries its per-image predictions as class bitmasks (one int per
image, bit c = class c), which are small enough to travel in a task result and a gate record.
A resample is a vector of multiplicities drawn once and applied to both models, so the two
scores of one resample are computed on the same images (paired); every gate metric is then a
weighted sum over images, one matrix product for all resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from protein.labels import NUM_CLASSES

# The course notebooks add this to every denominator (see protein.evaluation.metrics.course_f_score).
_COURSE_EPS = 1e-12
METRICS = ("f1_samples", "f1_micro", "f1_macro", "course_f_score")


def to_bitmasks(indicator: np.ndarray) -> list[int]:
    """bool (N, C) -> N ints, bit c set when class c is on."""
    indicator = np.asarray(indicator, dtype=bool)
    return (indicator.astype(np.int64) << np.arange(indicator.shape[1], dtype=np.int64)).sum(axis=1).tolist()


def from_bitmasks(masks: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """N ints -> bool (N, C)."""
    values = np.asarray(masks, dtype=np.int64).reshape(-1, 1)
    return (values >> np.arange(num_classes, dtype=np.int64)) & 1 == 1


@dataclass(frozen=True)
class PerImage:
    """What one model predicted on each evaluated image, as the gate metrics need it.

    pred: the submitted labels (thresholds plus the never-empty rule), for the F1 scores.
    raw: scores above the thresholds without that rule, which is what course_f_score counts.
    """

    pred: np.ndarray  # bool (N, C)
    raw: np.ndarray  # bool (N, C)
    targets: np.ndarray  # bool (N, C)

    @classmethod
    def from_evaluation(cls, evaluation: dict[str, Any]) -> PerImage:
        rows = evaluation["per_image"]
        return cls(from_bitmasks(rows["pred"]), from_bitmasks(rows["raw"]), from_bitmasks(rows["targets"]))

    def components(self, metric: str) -> np.ndarray:
        """(N, K) per-image terms whose weighted sums give the metric (see _metric_from_sums)."""
        t = self.targets
        if metric == "course_f_score":
            tp, fp, fn = (self.raw & t).sum(1), (self.raw & ~t).sum(1), (~self.raw & t).sum(1)
            return np.stack([tp / (tp + fp + _COURSE_EPS), tp / (tp + fn + _COURSE_EPS)], axis=1)
        p = self.pred
        tp, fp, fn = p & t, p & ~t, ~p & t  # (N, C)
        if metric == "f1_samples":
            row_tp, row_fp, row_fn = tp.sum(1), fp.sum(1), fn.sum(1)
            denominator = 2 * row_tp + row_fp + row_fn
            f1 = np.divide(2 * row_tp, denominator, out=np.zeros(len(p)), where=denominator > 0)
            return f1[:, None]
        if metric == "f1_micro":
            return np.stack([tp.sum(1), fp.sum(1), fn.sum(1)], axis=1).astype(np.float64)
        if metric == "f1_macro":
            return np.concatenate([tp, fp, fn], axis=1).astype(np.float64)  # (N, 3C)
        raise ValueError(f"unknown gate metric {metric!r}; expected one of {', '.join(METRICS)}")


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator, dtype=np.float64), where=denominator > 0)


def _metric_from_sums(metric: str, sums: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(B, K) weighted sums of the components, (B,) total weight -> (B,) metric values."""
    if metric == "f1_samples":
        return sums[:, 0] / total
    if metric == "course_f_score":
        precision, recall = sums[:, 0] / total, sums[:, 1] / total
        return 2 * precision * recall / (precision + recall + _COURSE_EPS)
    if metric == "f1_micro":
        return _f1(sums[:, 0], sums[:, 1], sums[:, 2])
    c = sums.shape[1] // 3
    return _f1(sums[:, :c], sums[:, c : 2 * c], sums[:, 2 * c :]).mean(axis=1)


def metric_value(metric: str, per_image: PerImage) -> float:
    """The metric on all images (weight 1 each): equals protein.evaluation.metrics.evaluate_predictions."""
    components = per_image.components(metric)
    return float(_metric_from_sums(metric, components.sum(0, keepdims=True), np.array([len(components)]))[0])


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: the point value on all rows and a percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """float64 (B, N) multiplicity of each image in each resample: the same as drawing n indices
    with replacement, but ready for one matrix product."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def resampled_scores(metric: str, per_image: PerImage, weights: np.ndarray) -> np.ndarray:
    """(B, N) multiplicities -> (B,) metric of each resample."""
    return _metric_from_sums(metric, weights @ per_image.components(metric), weights.sum(1))


def bootstrap(metric: str, challenger: PerImage, champion: PerImage | None, resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of the challenger's metric, or (with a champion) of its paired gain."""
    n = len(challenger.pred)
    if n == 0:
        raise ValueError("cannot bootstrap over zero images")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if champion is not None and not np.array_equal(champion.targets, challenger.targets):
        raise ValueError("the two evaluations do not hold the same rows (their targets differ)")
    weights = resample_weights(n, resamples, seed)
    values, estimate = resampled_scores(metric, challenger, weights), metric_value(metric, challenger)
    if champion is not None:
        # Paired: the same multiplicities for both models, so per-image luck cancels.
        values = values - resampled_scores(metric, champion, weights)
        estimate -= metric_value(metric, champion)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), confidence, resamples, seed, n)
