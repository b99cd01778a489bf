"""Thresholds tuned for the gate's metric with the never-empty rule, and scored on held-out rows."""

from __future__ import annotations

import numpy as np
import pytest

from protein.evaluation.metrics import evaluate_predictions, tune_thresholds
from protein.evaluation.thresholds import (
    METRICS,
    cross_fit,
    evaluate_with_row_thresholds,
    fine_grid,
    predict_labels,
    score,
    tune_for_metric,
)


def test_fine_grid_is_exact_hundredths():
    grid = fine_grid()
    assert grid.size == 99 and grid[0] == 0.01 and grid[-1] == 0.99 and 0.3 in grid


def test_predict_labels_falls_back_to_the_top_class_per_row():
    probs = np.array([[0.2, 0.4], [0.9, 0.1]])
    assert predict_labels(probs, np.array([0.5, 0.5])).tolist() == [[False, True], [True, False]]
    rows = np.array([[0.1, 0.1], [0.95, 0.95]])  # per-row thresholds
    assert predict_labels(probs, rows).tolist() == [[True, True], [True, False]]


def test_coordinate_ascent_uses_the_never_empty_rule():
    # Class 1 on its own: its F1 is best at a low threshold (catch both positives, one false
    # positive). With the fallback, a high threshold loses nothing on rows 0-1 (their top class
    # is class 1 anyway) and drops the false positive on row 2, whose class 0 is predicted.
    probs = np.array([[0.10, 0.30], [0.10, 0.35], [0.90, 0.325], [0.80, 0.05]])
    targets = np.array([[0, 1], [0, 1], [1, 0], [1, 0]])
    independent = tune_thresholds(probs, targets, fine_grid())
    assert independent[1] <= 0.29
    tuned = tune_for_metric(probs, targets, "f1_samples")
    assert tuned[1] == pytest.approx(0.33)  # the first cut that drops row 2's false positive
    assert score(probs, targets, tuned) == pytest.approx(1.0)
    assert score(probs, targets, independent) == pytest.approx(1 - (1 - 2 / 3) / 4)  # row 2 scores 2/3


def test_each_metric_is_maximised_not_just_f1_samples():
    rng = np.random.default_rng(0)
    targets = rng.random((60, 4)) < np.array([0.6, 0.3, 0.1, 0.05])
    probs = np.clip(targets * 0.3 + rng.random((60, 4)) * 0.7, 0, 1)
    for metric in ("f1_samples", "f1_micro", "f1_macro", "course_f_score"):
        tuned = tune_for_metric(probs, targets, metric)
        assert score(probs, targets, tuned, metric) >= score(probs, targets, np.full(4, 0.5), metric), metric
        # A local optimum: no single class improves by moving on the grid.
        best = score(probs, targets, tuned, metric)
        for c in range(4):
            for cut in fine_grid()[::7]:
                moved = tuned.astype(np.float64).copy()
                moved[c] = cut
                assert score(probs, targets, moved, metric) <= best + 1e-12, (metric, c, cut)


def test_score_matches_evaluate_predictions():
    rng = np.random.default_rng(1)
    probs = rng.random((30, 10))
    targets = rng.random((30, 10)) < 0.2
    thresholds = rng.uniform(0.2, 0.8, 10)
    reference = evaluate_predictions(probs, targets, thresholds)
    for metric in ("f1_samples", "f1_micro", "f1_macro", "course_f_score"):
        assert score(probs, targets, thresholds, metric) == pytest.approx(reference[metric]), metric
    rows = evaluate_with_row_thresholds(probs, targets, np.tile(thresholds, (30, 1)))
    assert rows["f1_samples"] == pytest.approx(reference["f1_samples"])
    assert rows["per_class"] == reference["per_class"]


def calibrated_holdout(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose best cut differs by class (a rare class scores low even when present), as a
    model trained with BCE on imbalanced labels does."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.45, 0.3, 0.15, 0.08, 0.05])
    targets = rng.random((n, 5)) < prevalence
    centre_pos = np.array([0.8, 0.6, 0.35, 0.25, 0.2])
    centre_neg = np.array([0.3, 0.2, 0.08, 0.05, 0.04])
    probs = np.where(targets, centre_pos, centre_neg) + rng.normal(0, 0.08, (n, 5))
    return np.clip(probs, 0.001, 0.999), targets


def test_tuning_improves_the_gate_metric_on_held_out_rows():
    probs, targets = calibrated_holdout(800, seed=2)
    fit_rows, report_rows = np.arange(400), np.arange(400, 800)
    tuned = tune_for_metric(probs[fit_rows], targets[fit_rows], "f1_samples")
    held_out = score(probs[report_rows], targets[report_rows], tuned)
    at_half = score(probs[report_rows], targets[report_rows], np.full(5, 0.5))
    assert held_out > at_half + 0.05
    # Starting from the per-class F1 cuts, ascent can only raise the metric on the rows it fits.
    independent = tune_thresholds(probs[fit_rows], targets[fit_rows], fine_grid())
    assert score(probs[fit_rows], targets[fit_rows], tuned) >= score(probs[fit_rows], targets[fit_rows], independent)


def test_cross_fit_reports_scores_the_thresholds_were_not_tuned_on():
    probs, targets = calibrated_holdout(300, seed=3)
    result = cross_fit(probs, targets, "f1_samples", seed=0)
    assert result.held_out["cross_fitted"] is True
    assert result.held_out["f1_samples"] > result.at_half
    # Tuning on the scored rows flatters them; the held-out figure is the lower, honest one.
    assert result.in_sample >= result.held_out["f1_samples"]
    assert result.in_sample == pytest.approx(score(probs, targets, result.thresholds))
    assert np.array_equal(result.thresholds, tune_for_metric(probs, targets, "f1_samples"))
    metrics = result.metrics()
    assert metrics["f1_samples"] == result.held_out["f1_samples"]
    assert metrics["thresholds_tuning"]["in_sample"] == result.in_sample and len(metrics["thresholds"]) == 5


def test_cross_fit_rows_use_the_other_halfs_thresholds():
    # Class 0's best cut is 0.6 in the first half and 0.2 in the second; each half must be
    # scored with the other's cut, so both halves look worse than when tuned in sample.
    probs = np.array([[0.7, 0.9]] * 4 + [[0.5, 0.9]] * 4 + [[0.3, 0.9]] * 4 + [[0.1, 0.9]] * 4)
    targets = np.array([[1, 1]] * 4 + [[0, 1]] * 4 + [[1, 1]] * 4 + [[0, 1]] * 4)
    result = cross_fit(probs, targets, "f1_samples", halves=(np.arange(8), np.arange(8, 16)))
    # Half 1 tuned at 0.5 leaves half 2's positives (0.3) out; half 2 tuned below 0.3 lets half
    # 1's negatives (0.5) in: 8 of 16 rows score 2/3.
    assert result.held_out["f1_samples"] == pytest.approx((8 + 8 * 2 / 3) / 16)
    assert result.in_sample == pytest.approx((12 + 4 * 2 / 3) / 16)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown metric"):
        tune_for_metric(np.zeros((2, 2)), np.zeros((2, 2)), "accuracy")
    with pytest.raises(ValueError, match="one non-empty"):
        tune_for_metric(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        tune_for_metric(np.full((2, 2), np.nan), np.zeros((2, 2)))


def one_cut_at_a_time(probs: np.ndarray, targets: np.ndarray, metric: str) -> np.ndarray:
    """The coordinate ascent as first written (and as the module's docstring describes it): `score`
    once per cut, in grid order, a cut kept only if it beats the best so far."""
    grid = fine_grid().astype(np.float32).astype(np.float64)
    thresholds = tune_thresholds(probs, targets, grid).astype(np.float32).astype(np.float64)
    best = score(probs, targets, thresholds, metric)
    for _ in range(10):
        improved = False
        for c in range(probs.shape[1]):
            keep = thresholds[c]
            for cut in grid:
                thresholds[c] = cut
                if (value := score(probs, targets, thresholds, metric)) > best + 1e-12:
                    best, keep, improved = value, cut, True
            thresholds[c] = keep
        if not improved:
            break
    return thresholds.astype(np.float32)


@pytest.mark.parametrize("cells", [None, 50])  # every cut in one pass; a few cuts per pass
def test_the_cuts_scored_together_choose_what_one_cut_at_a_time_chooses(monkeypatch, cells):
    """Bit for bit, every metric: probabilities equal to cuts, float32 scores, rows the never-empty
    rule fills, a single row."""
    import protein.evaluation.thresholds as thresholds_module

    if cells is not None:
        monkeypatch.setattr(thresholds_module, "_SWEEP_CELLS", cells)
    rng = np.random.default_rng(7)
    for n, c, on_grid in [(1, 3, False), (4, 10, True), (9, 3, False), (30, 4, True), (50, 10, False)]:
        targets = rng.random((n, c)) < 0.3
        probs = np.clip(targets * 0.35 + rng.random((n, c)) * 0.6, 0, 1)
        # On the grid as it is compared (float32): a probability equal to a cut, which is not above it.
        probs = (np.round(probs, 2) if on_grid else probs).astype(np.float32)
        for metric in METRICS:
            assert np.array_equal(tune_for_metric(probs, targets, metric),
                                  one_cut_at_a_time(probs.astype(np.float64), targets, metric)), (n, c, metric)
