"""Per-class thresholds tuned for the metric that is used, and scored on rows they were not
tuned on. Pure functions over numpy arrays.

`tune_thresholds` in protein.evaluation.metrics picks each class's threshold for that class's own F1,
ignoring the rule that an image is never left without a label. Here the thresholds maximise the
gate's metric (samples-F1 by default) of the labels a submission would contain, that rule
applied, by coordinate ascent on a 0.01 grid: one class at a time, the others fixed, until a
full round changes nothing. Because tuned thresholds flatter the rows they were tuned on,
`cross_fit` tunes on one half of the rows and scores the other, both ways round.

A class's cuts are scored all at once (`_sweep`): the metric of every cut with the other classes'
thresholds fixed, as `score` computes it one cut at a time, the same operations on a leading cut
axis, so the values and the thresholds chosen are the same bit for bit
(tests/unit/test_thresholds.py holds the one-cut-at-a-time search as the reference). One cut at a
time cost ~5,900 `score` calls per cross-fit, most of it numpy's per-call overhead on a small
holdout: 0.16 CPU-s for 4 rows, now 0.0065 (docs/benchmarks.md, "Threshold tuning").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protein.evaluation.metrics import (
    _COURSE_EPS,
    _counts,
    _f1_from_counts,
    course_f_score,
    f1_scores,
    per_class_scores,
    tune_thresholds,
)

METRICS = ("f1_samples", "f1_micro", "f1_macro", "course_f_score")
# Improvements smaller than this are float noise, not a better threshold.
_MIN_IMPROVEMENT = 1e-12
# Cuts scored together in one pass hold at most about this many (cut, row, class) cells.
_SWEEP_CELLS = 4_000_000


def fine_grid() -> np.ndarray:
    """0.01, 0.02, ..., 0.99 (rounded, so 0.3 is exactly the float 0.3)."""
    return np.round(np.arange(1, 100) * 0.01, 2)


def _check(probs: np.ndarray, targets: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if probs.ndim != 2 or probs.shape != targets.shape or probs.shape[0] == 0:
        raise ValueError(f"expected probs and targets of one non-empty (N, C) shape, got {probs.shape} and "
                         f"{targets.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("expected probs to be finite, found NaN or inf")
    return probs, targets.astype(bool)


def predict_labels(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """bool (N, C): probs (N, C) above their thresholds ((C,) or per row (N, C)); an image with none
    gets its most probable class (the never-empty rule of protein.evaluation.metrics.binarize).
    Thresholds with leading axes give predictions with them: (G, 1, C) -> (G, N, C), one set per cut."""
    pred = probs > thresholds
    *sets, rows = np.nonzero(~pred.any(axis=-1))
    pred[(*sets, rows, probs.argmax(axis=1)[rows])] = True
    return pred


def score(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, metric: str = "f1_samples") -> float:
    """The metric of the labels a submission would contain with these thresholds."""
    probs, targets = _check(probs, targets, metric)
    return _score(probs, targets, np.asarray(thresholds, dtype=np.float64), metric)


def _score(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, metric: str) -> float:
    if metric == "course_f_score":
        # The notebooks' score thresholds raw scores (no fallback); p > t  <=>  p - t + 0.5 > 0.5,
        # which also handles per-row thresholds.
        return course_f_score(probs - thresholds + 0.5, targets, 0.5)
    return f1_scores(predict_labels(probs, thresholds), targets)[metric]


def _scores_of(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, metric: str) -> np.ndarray:
    """`_score` for each row of ``thresholds`` (G, C) at once: (G,) values, computed exactly as
    `_score` does for one (C,) row (predict_labels, then f1_scores or course_f_score), along a
    leading axis."""
    cut = thresholds[:, None, :]  # (G, 1, C) against probs (N, C)
    if metric == "course_f_score":
        tp, fp, fn = _counts(probs - cut + 0.5 > 0.5, targets, axis=2)
        precision = np.mean(tp / (tp + fp + _COURSE_EPS), axis=1)
        recall = np.mean(tp / (tp + fn + _COURSE_EPS), axis=1)
        beta2 = 1.0  # course_f_score's default beta, squared
        return (1 + beta2) * precision * recall / (beta2 * precision + recall + _COURSE_EPS)
    pred = predict_labels(probs, cut)  # (G, N, C)
    if metric == "f1_samples":
        return _f1_from_counts(*_counts(pred, targets, axis=2)).mean(axis=1)
    tp, fp, fn = _counts(pred, targets, axis=1)  # per class: (G, C)
    if metric == "f1_macro":
        return _f1_from_counts(tp, fp, fn).mean(axis=1)
    return _f1_from_counts(tp.sum(1), fp.sum(1), fn.sum(1))  # f1_micro


def _sweep(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, c: int, grid: np.ndarray,
           metric: str) -> np.ndarray:
    """The metric with class c's threshold at each grid value and the others' as given: (G,)."""
    step = max(1, _SWEEP_CELLS // probs.size)
    values = np.empty(grid.size, dtype=np.float64)
    for start in range(0, grid.size, step):
        cuts = np.repeat(thresholds[None, :], min(step, grid.size - start), axis=0)
        cuts[:, c] = grid[start:start + step]
        values[start:start + len(cuts)] = _scores_of(probs, targets, cuts, metric)
    return values


def tune_for_metric(
    probs: np.ndarray,
    targets: np.ndarray,
    metric: str = "f1_samples",
    grid: np.ndarray | None = None,
    start: np.ndarray | None = None,
    max_rounds: int = 10,
) -> np.ndarray:
    """Coordinate ascent: float32 (C,) thresholds from `grid` (default 0.01 steps) maximising
    `metric` with the never-empty rule. Starts from each class's own-F1 threshold (or `start`);
    a class moves only to a strictly better threshold, so ties keep the current value."""
    probs, targets = _check(probs, targets, metric)
    grid = fine_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"expected grid to be a non-empty 1-D array, got shape {grid.shape}")
    # Tune with the float32 values that are shipped, so a probability equal to a grid value is
    # judged during tuning as it will be in use.
    grid = grid.astype(np.float32).astype(np.float64)
    start = tune_thresholds(probs, targets, grid) if start is None else np.asarray(start)
    thresholds = start.astype(np.float32).astype(np.float64)
    best = _score(probs, targets, thresholds, metric)
    for _ in range(max_rounds):
        improved = False
        for c in range(probs.shape[1]):
            keep = thresholds[c]
            # In grid order, as one cut at a time: a cut must beat the best so far, earlier cuts
            # of this class included.
            for cut, value in zip(grid, _sweep(probs, targets, thresholds, c, grid, metric), strict=True):
                if value > best + _MIN_IMPROVEMENT:
                    best, keep, improved = float(value), cut, True
            thresholds[c] = keep
        if not improved:
            break
    return thresholds.astype(np.float32)


def evaluate_with_row_thresholds(probs: np.ndarray, targets: np.ndarray, row_thresholds: np.ndarray) -> dict[str, Any]:
    """protein.evaluation.metrics.evaluate_predictions' scores when each row has its own (C,) thresholds
    (cross-fitted: a row's thresholds were tuned on other rows)."""
    probs, targets = _check(probs, targets, "f1_samples")
    if row_thresholds.shape != probs.shape:
        raise ValueError(f"expected per-row thresholds of shape {probs.shape}, got {row_thresholds.shape}")
    pred = predict_labels(probs, row_thresholds)
    scores = f1_scores(pred, targets)
    return {
        "course_f_score": _score(probs, targets, row_thresholds, "course_f_score"),
        "f1_samples": scores["f1_samples"],
        "f1_micro": scores["f1_micro"],
        "f1_macro": scores["f1_macro"],
        "per_class": per_class_scores(pred, targets),
        "n_images": int(probs.shape[0]),
    }


@dataclass(frozen=True)
class CrossFit:
    thresholds: np.ndarray  # (C,) tuned on every row: what a model ships with
    held_out: dict[str, Any]  # scores of each half with the thresholds tuned on the other half
    in_sample: float  # the metric with `thresholds` on the rows they were tuned on (optimistic)
    at_half: float  # the metric at 0.5 for every class, for comparison
    metric: str
    row_thresholds: np.ndarray  # (N, C): the thresholds each row's held_out score was taken with

    def metrics(self) -> dict[str, Any]:
        """The held-out scores as the report of a model (evaluate_predictions' keys), the shipped
        thresholds, and how they were tuned (with the optimistic in-sample score beside)."""
        return {**self.held_out, "thresholds": [float(t) for t in self.thresholds],
                "thresholds_tuning": {"metric": self.metric, "in_sample": self.in_sample, "at_half": self.at_half,
                                      "cross_fitted": self.held_out["cross_fitted"],
                                      "method": "coordinate ascent on a 0.01 grid with the never-empty rule; "
                                                "scores tuned on one half of the holdout and taken on the other, "
                                                "both ways round"}}


def cross_fit(probs: np.ndarray, targets: np.ndarray, metric: str = "f1_samples", seed: int = 0,
              grid: np.ndarray | None = None, halves: tuple[np.ndarray, np.ndarray] | None = None) -> CrossFit:
    """Tune on every row for the shipped thresholds; report the metric cross-fitted over two
    halves (by default split by seeded iterative stratification) so the reported score is not
    the tuned one."""
    from protein.split import iterative_stratified_split

    probs, targets = _check(probs, targets, metric)
    thresholds = tune_for_metric(probs, targets, metric, grid)
    in_sample = _score(probs, targets, thresholds.astype(np.float64), metric)
    at_half = _score(probs, targets, np.full(probs.shape[1], 0.5), metric)
    if probs.shape[0] < 4:  # too few rows to halve: report the in-sample score, marked as such
        held_out = evaluate_with_row_thresholds(probs, targets, np.tile(thresholds, (probs.shape[0], 1)))
        held_out["cross_fitted"] = False
        return CrossFit(thresholds, held_out, in_sample, at_half, metric, np.tile(thresholds, (probs.shape[0], 1)))
    first, second = halves if halves is not None else iterative_stratified_split(targets, 0.5, seed)
    rows = np.empty_like(probs)
    for fit_rows, score_rows in ((first, second), (second, first)):
        rows[score_rows] = tune_for_metric(probs[fit_rows], targets[fit_rows], metric, grid)
    held_out = evaluate_with_row_thresholds(probs, targets, rows)
    held_out["cross_fitted"] = True
    return CrossFit(thresholds, held_out, in_sample, at_half, metric, rows)


def cross_fitted_rows(probs: np.ndarray, targets: np.ndarray, metric: str = "f1_samples",
                      seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Scores of `probs` on these rows with thresholds tuned on other rows only (`cross_fit`'s
    halves: seeded iterative stratification of the targets alone, so every model scored on the
    same rows gets the same halves), and the (N, C) thresholds each row was judged with. The gate
    scores both models this way: a model's shipped thresholds may have been tuned on some of
    these rows (a challenger's whole holdout), which flatters it."""
    tuned = cross_fit(probs, targets, metric, seed=seed)
    return tuned.held_out, tuned.row_thresholds
