import json

import numpy as np
import pytest

from protein.evaluation.metrics import (
    binarize,
    course_f_score,
    evaluate_predictions,
    f1_scores,
    per_class_scores,
    prior_baseline,
    tune_thresholds,
)

# Two images, three classes, used by several tests.
#   targets  row0 {0}        row1 {0, 1, 2}
#   pred     row0 {0, 1}     row1 {0}         (probs > 0.5)
TARGETS = np.array([[1, 0, 0], [1, 1, 1]], dtype=np.float32)
PROBS = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.1]], dtype=np.float32)
PRED = PROBS > 0.5


def test_course_f_score_means_over_images_before_taking_f():
    # row0: TP=1 FP=1 FN=0 -> P=1/2 R=1 ; row1: TP=1 FP=0 FN=2 -> P=1 R=1/3
    # mean P = 3/4, mean R = 2/3 ; F1 = 2 * 3/4 * 2/3 / (3/4 + 2/3) = 1 / (17/12) = 12/17
    assert course_f_score(PROBS, TARGETS) == pytest.approx(12 / 17, abs=1e-9)
    # Micro precision is TP / (TP + FP) = 2/3, not the 3/4 the course averages over images.
    assert f1_scores(PRED, TARGETS)["precision_micro"] == pytest.approx(2 / 3)


def test_course_f_score_beta_two():
    # F2 = 5 * P * R / (4 * P + R) = 5 * 3/4 * 2/3 / (3 + 2/3) = 2.5 / (11/3) = 15/22
    assert course_f_score(PROBS, TARGETS, beta=2.0) == pytest.approx(15 / 22, abs=1e-9)


def test_course_f_score_per_class_threshold():
    probs = np.array([[0.6, 0.3]])
    targets = np.array([[1, 1]])
    # Scalar 0.5: pred {0} -> P=1 R=1/2 -> F1 = 2 * 1/2 / (3/2) = 2/3
    assert course_f_score(probs, targets, 0.5) == pytest.approx(2 / 3, abs=1e-9)
    # Per-class [0.5, 0.2]: pred {0, 1} -> P=R=1 -> F1 = 1
    assert course_f_score(probs, targets, np.array([0.5, 0.2])) == pytest.approx(1.0, abs=1e-9)


def test_course_f_score_empty_predictions_score_zero_not_nan():
    # TP = 0 everywhere; the course epsilon turns 0/0 into 0.
    assert course_f_score(np.zeros((2, 3)), TARGETS) == 0.0


def test_binarize_thresholds_strictly_and_falls_back_to_top_class():
    probs = np.array([[0.2, 0.4, 0.1], [0.7, 0.5, 0.1]])
    # row0 has nothing above 0.5 -> its top class (1, at 0.4) ; row1: 0.5 is not > 0.5
    expected = np.array([[False, True, False], [True, False, False]])
    np.testing.assert_array_equal(binarize(probs, 0.5), expected)
    assert binarize(probs, 0.5).dtype == np.bool_


def test_binarize_without_fallback_leaves_row_empty():
    probs = np.array([[0.2, 0.4, 0.1], [0.7, 0.6, 0.1]])
    expected = np.array([[False, False, False], [True, True, False]])
    np.testing.assert_array_equal(binarize(probs, 0.5, ensure_one=False), expected)


def test_binarize_per_class_thresholds_make_fallback_unneeded():
    probs = np.array([[0.2, 0.4, 0.1]])
    # 0.2 > 0.1 for class 0 -> row is non-empty, so class 1 (the top score) is not added
    np.testing.assert_array_equal(binarize(probs, np.array([0.1, 0.5, 0.5])), [[True, False, False]])


def test_f1_scores_hand_computed():
    scores = f1_scores(PRED, TARGETS)
    # samples: row0 2*1/(2+1+0) = 2/3 ; row1 2*1/(2+0+2) = 1/2 ; mean 7/12
    assert scores["f1_samples"] == pytest.approx(7 / 12)
    # micro: TP=2 FP=1 FN=2 -> 2*2/(4+1+2) = 4/7 ; P = 2/3 ; R = 2/4
    assert scores["f1_micro"] == pytest.approx(4 / 7)
    assert scores["recall_micro"] == pytest.approx(1 / 2)
    # macro: class0 TP=2 -> 1 ; class1 TP=0 FP=1 FN=1 -> 0 ; class2 TP=0 FN=1 -> 0 ; mean 1/3
    assert scores["f1_macro"] == pytest.approx(1 / 3)
    assert set(scores) == {"f1_samples", "f1_micro", "f1_macro", "precision_micro", "recall_micro"}


def test_f1_scores_empty_row_and_absent_class_score_zero():
    # zero_division=0: row0 has no true and no predicted label -> its F1 is 0 ; row1 is perfect.
    targets = np.array([[0, 0], [1, 0]])
    pred = np.array([[False, False], [True, False]])
    scores = f1_scores(pred, targets)
    assert scores["f1_samples"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert scores["f1_micro"] == pytest.approx(1.0)  # TP=1, FP=FN=0
    assert scores["f1_macro"] == pytest.approx(0.5)  # class0 1, class1 absent and unpredicted -> 0
    assert scores["precision_micro"] == pytest.approx(1.0)


def test_f1_scores_nothing_predicted_nothing_true_is_zero_not_nan():
    scores = f1_scores(np.zeros((2, 2), dtype=bool), np.zeros((2, 2)))
    assert scores == {
        "f1_samples": 0.0,
        "f1_micro": 0.0,
        "f1_macro": 0.0,
        "precision_micro": 0.0,
        "recall_micro": 0.0,
    }


def test_per_class_scores_hand_computed():
    scores = per_class_scores(PRED, TARGETS)
    # class0 TP=2 FP=0 FN=0 ; class1 TP=0 FP=1 FN=1 ; class2 TP=0 FP=0 FN=1 (precision 0/0 -> 0)
    assert scores["precision"] == pytest.approx([1.0, 0.0, 0.0])
    assert scores["recall"] == pytest.approx([1.0, 0.0, 0.0])
    assert scores["f1"] == pytest.approx([1.0, 0.0, 0.0])
    assert scores["support"] == [2, 1, 1]
    assert all(type(s) is int for s in scores["support"])


def test_per_class_scores_partial_class():
    # one class: targets 1 1 0 0, pred 1 0 1 0 -> TP=1 FP=1 FN=1 -> P=R=1/2, F1 = 2/(2+1+1) = 1/2
    targets = np.array([[1], [1], [0], [0]])
    pred = np.array([[1], [0], [1], [0]])
    scores = per_class_scores(pred, targets)
    assert scores == {"precision": [0.5], "recall": [0.5], "f1": [0.5], "support": [2]}


def test_tune_thresholds_picks_the_separating_cut():
    probs = np.array(
        [
            [0.35, 0.90, 0.7, 0.9],
            [0.40, 0.95, 0.2, 0.8],
            [0.10, 0.60, 0.9, 0.1],
            [0.30, 0.85, 0.1, 0.1],
        ]
    )
    targets = np.array(
        [
            [1, 1, 0, 1],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    thresholds = tune_thresholds(probs, targets)
    # class0: positives 0.35, 0.40 ; negatives 0.10, 0.30 -> only 0.30 separates (0.30 > 0.30 is False)
    #         0.25 lets 0.30 in (F1 4/5), 0.35 drops 0.35 (F1 2/3)
    # class1: positives 0.90, 0.95 ; negatives 0.60, 0.85 -> only 0.85 separates
    # class2: no positives -> keeps 0.5
    # class3: positive 0.9, negatives 0.8, 0.1, 0.1 -> 0.80 and 0.85 both give F1 1; 0.80 is nearer 0.5
    np.testing.assert_allclose(thresholds, [0.30, 0.85, 0.5, 0.80], atol=1e-6)
    assert thresholds.dtype == np.float32
    assert thresholds.shape == (4,)


def test_tune_thresholds_ties_prefer_nearest_half_then_lower():
    probs = np.array([[0.95], [0.05]])
    targets = np.array([[1], [0]])
    # every grid value separates -> 0.5 itself wins from the default grid
    assert tune_thresholds(probs, targets)[0] == pytest.approx(0.5)
    # 0.4 and 0.6 are equally near 0.5 -> the lower one
    assert tune_thresholds(probs, targets, grid=np.array([0.6, 0.4]))[0] == pytest.approx(0.4)


def test_tune_thresholds_unlearnable_class_keeps_half():
    probs = np.array([[0.01], [0.9]])
    targets = np.array([[1], [0]])
    # Every grid value > 0.01, so the positive is never predicted: F1 = 0 everywhere -> tie -> 0.5
    assert tune_thresholds(probs, targets)[0] == pytest.approx(0.5)


def test_evaluate_predictions_is_json_serialisable_and_complete():
    report = evaluate_predictions(PROBS, TARGETS, np.array([0.5, 0.5, 0.5], dtype=np.float32))
    round_tripped = json.loads(json.dumps(report))
    assert round_tripped == report
    assert set(report) == {
        "course_f_score",
        "f1_samples",
        "f1_micro",
        "f1_macro",
        "per_class",
        "thresholds",
        "n_images",
    }
    assert report["n_images"] == 2
    assert report["thresholds"] == [0.5, 0.5, 0.5]
    assert report["course_f_score"] == pytest.approx(12 / 17, abs=1e-9)
    assert report["f1_micro"] == pytest.approx(4 / 7)
    assert report["per_class"]["support"] == [2, 1, 1]


def test_evaluate_predictions_scores_f1_after_the_fallback():
    # Nothing above 0.5: F1 uses the top class of each row, the course score uses the raw cut.
    probs = np.array([[0.4, 0.1], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 1]])
    report = evaluate_predictions(probs, targets)
    assert report["f1_samples"] == pytest.approx(1.0)
    assert report["course_f_score"] == 0.0
    assert report["thresholds"] == [0.5, 0.5]


def test_perfect_predictions_score_one_everywhere():
    targets = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 1, 0]])
    probs = np.where(targets == 1, 0.9, 0.1)
    report = evaluate_predictions(probs, targets)
    assert report["course_f_score"] == pytest.approx(1.0, abs=1e-9)
    assert report["f1_samples"] == 1.0
    assert report["f1_micro"] == 1.0
    assert report["f1_macro"] == 1.0
    assert report["per_class"]["precision"] == [1.0, 1.0, 1.0]
    assert report["per_class"]["recall"] == [1.0, 1.0, 1.0]
    assert report["per_class"]["f1"] == [1.0, 1.0, 1.0]


def test_prior_baseline_predicts_training_frequencies():
    train = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    probs = prior_baseline(train, 2)
    # class frequencies: 3/4, 1/4, 0/4
    np.testing.assert_allclose(probs, [[0.75, 0.25, 0.0], [0.75, 0.25, 0.0]])
    assert probs.dtype == np.float32
    assert prior_baseline(train, 0).shape == (0, 3)


def test_prior_baseline_evaluates_as_always_the_commonest_class():
    train = np.array([[1, 0], [1, 1], [1, 0], [0, 1]])  # frequencies 3/4, 2/4
    holdout = np.array([[1, 0], [0, 1]])
    report = evaluate_predictions(prior_baseline(train, 2), holdout)
    # 0.75 > 0.5 -> class0 for both rows; 0.5 is not > 0.5 -> class1 never predicted
    # samples: row0 1, row1 0 -> 1/2 ; micro TP=1 FP=1 FN=1 -> 2/4
    assert report["f1_samples"] == pytest.approx(0.5)
    assert report["f1_micro"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: course_f_score(np.zeros((2, 3)), np.zeros((2, 4))),
        lambda: course_f_score(np.zeros(3), np.zeros(3)),
        lambda: course_f_score(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0.5, 0.5])),
        lambda: binarize(np.zeros((2, 3)), np.array([0.5, 0.5])),
        lambda: binarize(np.array([[0.1, np.nan]])),
        lambda: f1_scores(np.zeros((2, 3), dtype=bool), np.zeros((3, 3))),
        lambda: f1_scores(np.full((2, 3), 0.7), np.zeros((2, 3))),
        lambda: f1_scores(np.zeros((0, 3), dtype=bool), np.zeros((0, 3))),
        lambda: per_class_scores(np.zeros((2, 3, 1)), np.zeros((2, 3, 1))),
        lambda: tune_thresholds(np.zeros((2, 3)), np.zeros((2, 2))),
        lambda: tune_thresholds(np.zeros((2, 3)), np.zeros((2, 3)), grid=np.array([])),
        lambda: evaluate_predictions(np.zeros((2, 3)), np.zeros((1, 3))),
        lambda: prior_baseline(np.zeros(3), 2),
        lambda: prior_baseline(np.zeros((2, 3)), -1),
    ],
)
def test_bad_shapes_and_values_raise_value_error(call):
    with pytest.raises(ValueError, match="expected"):
        call()
