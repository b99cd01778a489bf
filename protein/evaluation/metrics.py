"""Multi-label scores, threshold tuning and the predict-the-prior baseline, over plain numpy arrays.

Conventions: `probs` are (N, C) scores in [0, 1]; `targets` and `pred` are (N, C) booleans or 0/1.
A score is positive when it is strictly greater than its threshold, as in the course notebooks.
Where a ratio has a zero denominator the score is 0, as scikit-learn does with `zero_division=0`.
"""

from __future__ import annotations

import numpy as np

# The course notebooks add this to every denominator instead of special-casing zeros.
_COURSE_EPS = 1e-12


def _as_2d(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected {name} to be 2-D (images, classes), got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"expected {name} to have at least one row, got shape {array.shape}")
    return array


def _check_pair(left_name: str, left: np.ndarray, right_name: str, right: np.ndarray) -> None:
    if left.shape != right.shape:
        raise ValueError(
            f"expected {left_name} and {right_name} to have the same shape, got {left.shape} and {right.shape}"
        )


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = _as_2d("probs", probs).astype(np.float64, copy=False)
    # NaN compares False against every threshold and would silently read as "absent".
    if not np.all(np.isfinite(probs)):
        raise ValueError("expected probs to be finite, found NaN or inf")
    return probs


def _as_indicator(name: str, array: np.ndarray) -> np.ndarray:
    array = _as_2d(name, array)
    if array.dtype != np.bool_:
        # Probabilities passed by mistake would otherwise be truncated into a plausible-looking score.
        if not np.all((array == 0) | (array == 1)):
            raise ValueError(f"expected {name} to hold only 0/1 or booleans; binarize probabilities first")
        array = array.astype(bool)
    return array


def _as_thresholds(thresholds: np.ndarray | float, num_classes: int) -> np.ndarray:
    """Scalar or (C,) -> float64 (C,), so one shape flows through the rest."""
    values = np.asarray(thresholds, dtype=np.float64)
    if values.ndim == 0:
        return np.full(num_classes, float(values))
    if values.shape != (num_classes,):
        raise ValueError(f"expected a scalar threshold or one per class ({num_classes},), got shape {values.shape}")
    return values


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _counts(pred: np.ndarray, targets: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives summed along `axis`."""
    tp = (pred & targets).sum(axis)
    fp = (pred & ~targets).sum(axis)
    fn = (~pred & targets).sum(axis)
    return tp, fp, fn


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2TP / (2TP + FP + FN) is the form scikit-learn documents; it equals the harmonic mean of precision
    # and recall wherever both are defined and is 0 when TP + FP + FN == 0 (zero_division=0).
    return _safe_ratio(2 * tp, 2 * tp + fp + fn)


def course_f_score(
    probs: np.ndarray,
    targets: np.ndarray,
    threshold: float | np.ndarray = 0.5,
    beta: float = 1.0,
) -> float:
    """F-beta as the Jovian "Zero to GANs" notebooks compute it, to compare with their numbers.

    Precision and recall are averaged over images first and F is taken of those means, so it is
    neither the sample-averaged nor the micro F1. Targets are thresholded like the scores, as the
    notebook does; 0/1 targets are unchanged by any threshold in [0, 1).
    """
    probs = _as_probs(probs)
    targets = _as_2d("targets", targets).astype(np.float64, copy=False)
    _check_pair("probs", probs, "targets", targets)
    thresholds = _as_thresholds(threshold, probs.shape[1])
    predicted = probs > thresholds
    actual = targets > thresholds
    tp, fp, fn = _counts(predicted, actual, axis=1)
    precision = np.mean(tp / (tp + fp + _COURSE_EPS))
    recall = np.mean(tp / (tp + fn + _COURSE_EPS))
    beta2 = beta**2
    return float((1 + beta2) * precision * recall / (beta2 * precision + recall + _COURSE_EPS))


def binarize(probs: np.ndarray, thresholds: np.ndarray | float = 0.5, ensure_one: bool = True) -> np.ndarray:
    """Scores -> bool (N, C) predictions; with `ensure_one`, an empty row gets its top-scoring class.

    Every image in this dataset has at least one label, so an empty prediction is always wrong.
    """
    probs = _as_probs(probs)
    pred = probs > _as_thresholds(thresholds, probs.shape[1])
    if ensure_one:
        empty = ~pred.any(axis=1)
        pred[np.flatnonzero(empty), probs[empty].argmax(axis=1)] = True
    return pred


def f1_scores(pred: np.ndarray, targets: np.ndarray) -> dict:
    """Sample, micro and macro F1 plus micro precision and recall, as scikit-learn's `zero_division=0`.

    f1_samples: F1 of each row, averaged; a row with no true and no predicted label scores 0.
    f1_macro: per-class F1 averaged over all C classes, an absent and never-predicted class counting 0.
    """
    pred = _as_indicator("pred", pred)
    targets = _as_indicator("targets", targets)
    _check_pair("pred", pred, "targets", targets)
    row_tp, row_fp, row_fn = _counts(pred, targets, axis=1)
    class_tp, class_fp, class_fn = _counts(pred, targets, axis=0)
    tp, fp, fn = class_tp.sum(), class_fp.sum(), class_fn.sum()
    return {
        "f1_samples": float(_f1_from_counts(row_tp, row_fp, row_fn).mean()),
        "f1_micro": float(_f1_from_counts(tp, fp, fn)),
        "f1_macro": float(_f1_from_counts(class_tp, class_fp, class_fn).mean()),
        "precision_micro": float(_safe_ratio(tp, tp + fp)),
        "recall_micro": float(_safe_ratio(tp, tp + fn)),
    }


def per_class_scores(pred: np.ndarray, targets: np.ndarray) -> dict[str, list[float]]:
    """Precision, recall, F1 and support (true count) of each class, `zero_division=0`."""
    pred = _as_indicator("pred", pred)
    targets = _as_indicator("targets", targets)
    _check_pair("pred", pred, "targets", targets)
    tp, fp, fn = _counts(pred, targets, axis=0)
    return {
        "precision": _safe_ratio(tp, tp + fp).tolist(),
        "recall": _safe_ratio(tp, tp + fn).tolist(),
        "f1": _f1_from_counts(tp, fp, fn).tolist(),
        "support": [int(s) for s in targets.sum(axis=0)],
    }


def _default_grid() -> np.ndarray:
    # Rounded so 0.3 is 0.3, not 0.30000000000000004, and ties to 0.5 measure cleanly.
    return np.round(np.arange(1, 20) * 0.05, 2)


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per-class threshold from `grid` that maximises that class's F1 on a holdout; float32 (C,).

    Classes are tuned independently, without the at-least-one-label fallback of `binarize`.
    Ties go to the threshold closest to 0.5 (then the lower one), so flat stretches of the F1 curve
    do not drag a threshold to the grid's edge; a class with no positives keeps 0.5.
    """
    probs = _as_probs(probs)
    targets = _as_indicator("targets", targets)
    _check_pair("probs", probs, "targets", targets)
    grid = _default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"expected grid to be a non-empty 1-D array of thresholds, got shape {grid.shape}")

    # One pass per grid value keeps memory at O(N * C) rather than O(G * N * C).
    f1 = np.empty((grid.size, probs.shape[1]), dtype=np.float64)  # (G, C)
    for row, cut in enumerate(grid):
        f1[row] = _f1_from_counts(*_counts(probs > cut, targets, axis=0))

    # Visit thresholds nearest 0.5 first (lower first on equal distance): argmax keeps the first maximum.
    order = np.lexsort((grid, np.abs(grid - 0.5)))
    best = order[np.argmax(f1[order], axis=0)]
    thresholds = grid[best]
    thresholds[~targets.any(axis=0)] = 0.5
    return thresholds.astype(np.float32)


def evaluate_predictions(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | float = 0.5) -> dict:
    """Every holdout score in one JSON-serialisable dict of plain floats, ints and lists.

    course_f_score is computed from the raw scores, as the notebooks do; the F1 scores are computed
    from `binarize(probs, thresholds, ensure_one=True)`, the labels a submission would contain.
    """
    probs = _as_probs(probs)
    targets = _as_indicator("targets", targets)
    _check_pair("probs", probs, "targets", targets)
    per_class_thresholds = _as_thresholds(thresholds, probs.shape[1])
    pred = binarize(probs, per_class_thresholds, ensure_one=True)
    scores = f1_scores(pred, targets)
    return {
        "course_f_score": course_f_score(probs, targets, per_class_thresholds),
        "f1_samples": scores["f1_samples"],
        "f1_micro": scores["f1_micro"],
        "f1_macro": scores["f1_macro"],
        "per_class": per_class_scores(pred, targets),
        "thresholds": [float(t) for t in per_class_thresholds],
        "n_images": int(probs.shape[0]),
    }


def prior_baseline(train_targets: np.ndarray, n: int) -> np.ndarray:
    """Float32 (n, C) scores that give every image each class's training frequency.

    The floor a trained model must beat: it knows the label distribution and nothing about images.
    """
    train_targets = _as_indicator("train_targets", train_targets)
    if n < 0:
        raise ValueError(f"expected a non-negative number of images, got {n}")
    frequency = train_targets.mean(axis=0, dtype=np.float64).astype(np.float32)  # (C,)
    return np.tile(frequency, (n, 1))
