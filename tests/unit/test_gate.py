"""The gate: fair row selection, the paired bootstrap, and the decision, on hand-built data."""

from __future__ import annotations

import numpy as np
import pytest

from protein.config import GateConfig
from protein.errors import EvidenceRefused
from protein.evaluation.bootstrap import (
    METRICS,
    PerImage,
    bootstrap,
    from_bitmasks,
    metric_value,
    resample_weights,
    resampled_scores,
    to_bitmasks,
)
from protein.evaluation.gate import decide, ids_digest, select_rows
from protein.evaluation.metrics import binarize, evaluate_predictions
from protein.evaluation.report import gate_markdown

CONFIG = GateConfig(min_score=0.5, min_gain=0.01, max_class_drop=0.1, min_rows=50)


def random_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.random((n, 10)) < 0.2
    targets[np.arange(n), rng.integers(0, 10, n)] = True  # every image has a label, as in the data
    probs = np.clip(targets * 0.5 + rng.random((n, 10)) * 0.6, 0, 1)
    return probs, targets


def per_image(probs: np.ndarray, targets: np.ndarray, thresholds: float = 0.5) -> PerImage:
    return PerImage(binarize(probs, thresholds), probs > thresholds, targets.astype(bool))


def evaluation(pred: np.ndarray, targets: np.ndarray, ids: list[str] | None = None, **rows) -> dict:
    """An evaluation dict as protein.pipeline builds it, from submitted labels on given rows."""
    probs = pred.astype(np.float64)  # 0/1 scores: binarize at 0.5 gives pred back
    metrics = evaluate_predictions(probs, targets, 0.5)
    ids = ids or [str(i) for i in range(len(pred))]
    summary = {"n": len(ids), "sha256": ids_digest(ids), "selection": "test rows", **rows}
    return {**metrics, "rows": summary, "per_image": {
        "pred": to_bitmasks(binarize(probs, 0.5)), "raw": to_bitmasks(probs > 0.5), "targets": to_bitmasks(targets)}}


def test_bitmasks_round_trip():
    indicator = np.random.default_rng(0).random((50, 10)) < 0.3
    masks = to_bitmasks(indicator)
    assert all(isinstance(m, int) for m in masks)
    np.testing.assert_array_equal(from_bitmasks(masks), indicator)


@pytest.mark.parametrize("metric", METRICS)
def test_per_image_terms_reproduce_the_holdout_metric(metric):
    probs, targets = random_case(300, 1)
    thresholds = np.linspace(0.3, 0.7, 10)
    expected = evaluate_predictions(probs, targets, thresholds)[metric]
    assert metric_value(metric, per_image(probs, targets, thresholds)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_each_resample_is_the_metric_recomputed_on_the_drawn_images(metric):
    probs, targets = random_case(120, 2)
    weights = resample_weights(120, 5, seed=3)
    scores = resampled_scores(metric, per_image(probs, targets), weights)
    for b in range(5):
        drawn = np.repeat(np.arange(120), weights[b].astype(int))  # the images this resample drew
        assert scores[b] == pytest.approx(evaluate_predictions(probs[drawn], targets[drawn], 0.5)[metric], abs=1e-12)


def test_identical_models_have_a_zero_gain_interval():
    probs, targets = random_case(200, 4)
    same = per_image(probs, targets)
    interval = bootstrap("f1_samples", same, same, resamples=1000, seed=0)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_bootstrap_is_seeded():
    probs, targets = random_case(200, 5)
    a, b = per_image(probs, targets), per_image(np.clip(probs + 0.1, 0, 1), targets)
    assert bootstrap("f1_macro", a, b, seed=7) == bootstrap("f1_macro", a, b, seed=7)
    assert bootstrap("f1_macro", a, b, seed=7) != bootstrap("f1_macro", a, b, seed=8)


def test_paired_interval_is_tighter_than_the_scores_spread():
    # The same hard images hurt both models: pairing removes that shared noise from the gain.
    _, targets = random_case(400, 6)
    probs = targets * 0.3 + np.random.default_rng(6).random(targets.shape) * 0.6
    better = np.where(targets, probs + 0.05, probs)
    gain = bootstrap("f1_samples", per_image(better, targets), per_image(probs, targets))
    alone = bootstrap("f1_samples", per_image(probs, targets), None)
    assert gain.low > 0 and gain.high - gain.low < (alone.high - alone.low) / 2


def test_select_rows_on_unchanged_data_is_the_shared_holdout():
    holdout, train = [str(i) for i in range(10)], [str(i) for i in range(10, 50)]
    rows = select_rows(holdout, train, holdout, has_champion=True)
    assert rows.ids == tuple(sorted(holdout)) and rows.problem is None
    assert (rows.from_champion_holdout, rows.new, rows.excluded) == (10, 0, 0)


def test_select_rows_after_a_data_change_never_uses_rows_the_champion_trained_on():
    champion_train = [f"a{i}" for i in range(80)]
    champion_holdout = [f"a{i}" for i in range(80, 100)]
    # New data: the old rows plus 30 new ones, split afresh: the challenger's holdout mixes old
    # training rows, old holdout rows and new rows.
    challenger_holdout = ["a1", "a2", "a3", "a81", "a82"] + [f"b{i}" for i in range(6)]
    rows = select_rows(challenger_holdout, champion_train, champion_holdout, has_champion=True)
    assert rows.ids == ("a81", "a82", "b0", "b1", "b2", "b3", "b4", "b5")
    assert not set(rows.ids) & set(champion_train)
    assert (rows.from_champion_holdout, rows.new, rows.excluded) == (2, 6, 3)
    assert "8 rows neither model trained on: 2 from the champion's holdout, 6 new" in rows.selection
    assert rows.to_dict()["n"] == 8 and rows.to_dict()["sha256"] == ids_digest(rows.ids)


def test_unknown_champion_rows_are_a_problem_not_a_guess():
    rows = select_rows(["1", "2"], None, None, has_champion=True)
    assert rows.ids == () and "unknown" in rows.problem
    assert select_rows(["2", "1"]).ids == ("1", "2")  # no champion: the challenger's holdout


def test_a_row_whose_bytes_a_model_trained_on_under_another_id_is_not_a_gate_row():
    """A push added 99999.png, a byte-identical copy of 123.png: the challenger trained on 99999
    and holds out 123; the champion trained on x7, whose bytes new row n5 repeats."""
    digest_of = {"123": "d-123", "99999": "d-123", "x7": "d-x7", "n5": "d-x7",
                 **{i: f"d-{i}" for i in ("x1", "x2", "x8", "x9", "n1", "n2")}}
    challenger_holdout, challenger_train = ["123", "x8", "x9", "n1", "n5"], ["99999", "x1", "x2", "x7", "n2"]
    champion_train, champion_holdout = ["x1", "x2", "x7", "x8"], ["123", "x9"]
    rows = select_rows(challenger_holdout, champion_train, champion_holdout, has_champion=True,
                       challenger_train=challenger_train, digest_of=digest_of)
    assert rows.ids == ("n1", "x9")
    assert (rows.from_champion_holdout, rows.new, rows.excluded, rows.copies) == (1, 1, 1, 2)
    assert rows.selection.endswith("; 2 rows dropped because a model trained on the same image bytes under another id")
    assert rows.to_dict()["copies"] == 2
    # No champion: the challenger's own copies are dropped all the same.
    alone = select_rows(challenger_holdout, challenger_train=challenger_train, digest_of=digest_of)
    assert alone.ids == ("n1", "x8", "x9") and alone.copies == 2  # the challenger trained on x7 too
    # Without digests nothing changes: the rows (and the sentence) are those of ids alone.
    assert select_rows(challenger_holdout, champion_train, champion_holdout, has_champion=True,
                       challenger_train=challenger_train).ids == ("123", "n1", "n5", "x9")


def pair(n: int, better_on: int, worse_on: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets, a champion that gets every image half right, and a challenger that fixes
    `better_on` images and breaks `worse_on` others."""
    targets = np.zeros((n, 10), dtype=bool)
    targets[:, 0] = targets[:, 1] = True
    champion = np.zeros_like(targets)
    champion[:, 0] = True
    challenger = champion.copy()
    challenger[:better_on, 1] = True
    challenger[better_on : better_on + worse_on, 0] = False
    challenger[better_on : better_on + worse_on, 2] = True
    return targets, champion, challenger


def test_first_model_promotes_if_it_clears_the_minimum_and_shows_its_interval():
    targets, _, good = pair(60, 60)
    decision = decide(evaluation(good, targets), None, CONFIG)
    assert decision.promote and decision.score_interval["estimate"] == pytest.approx(1.0)
    targets, half_right, _ = pair(60, 0)  # f1_samples 0.667
    rejected = decide(evaluation(half_right, targets), None, GateConfig(min_score=0.7))
    assert not rejected.promote and "below the minimum" in rejected.reasons[0]


def test_a_rerun_that_reproduces_the_champion_keeps_it():
    targets, champion, _ = pair(200, 0)
    decision = decide(evaluation(champion, targets), evaluation(champion, targets), CONFIG)
    assert not decision.promote and decision.gain == 0.0
    assert decision.gain_interval["low"] == decision.gain_interval["high"] == 0.0
    assert any("lower bound is below the required +0.0100" in r for r in decision.reasons)


def test_a_point_gain_that_is_noise_does_not_promote():
    # 4 images better, 1 worse out of 60: the point gain (+0.011) clears min_gain, the interval does not.
    targets, champion, challenger = pair(60, 4, 1)
    config = GateConfig(min_score=0.0, min_gain=0.01, max_class_drop=1.0, min_rows=50)
    decision = decide(evaluation(challenger, targets), evaluation(champion, targets), config)
    assert decision.gain > config.min_gain
    assert decision.gain_interval["low"] < config.min_gain < decision.gain_interval["high"]
    assert not decision.promote


def test_a_clear_gain_promotes():
    targets, champion, challenger = pair(200, 120)
    config = GateConfig(min_score=0.0, min_gain=0.01, max_class_drop=1.0, min_rows=50)
    decision = decide(evaluation(challenger, targets), evaluation(champion, targets), config)
    assert decision.promote and decision.gain_interval["low"] > 0.1
    assert decision.gain_interval["rows"] == 200 and decision.gain_interval["resamples"] == 1000


def test_too_few_fair_rows_keeps_the_champion_whatever_the_gain():
    targets, champion, challenger = pair(49, 49)
    decision = decide(evaluation(challenger, targets), evaluation(champion, targets), CONFIG)
    assert not decision.promote and decision.gain_interval is None
    assert any("only 49 rows neither model trained on, fewer than the 50" in r for r in decision.reasons)


def test_unknown_rows_keep_the_champion():
    targets, champion, challenger = pair(60, 60)
    problem = {"n": 0, "sha256": ids_digest([]), "problem": "the champion's training rows are unknown"}
    challenger_eval = {**evaluation(challenger, targets), "rows": problem}
    decision = decide(challenger_eval, {"model_id": "old", "rows": problem}, CONFIG)
    assert not decision.promote and decision.champion_score is None
    assert "no fair comparison: the champion's training rows are unknown" in decision.reasons[-1]


def test_a_class_collapse_blocks_promotion_even_with_overall_gain():
    targets, champion, challenger = pair(200, 200)
    targets[:100, 9] = champion[:100, 9] = True  # the champion finds class 9, the challenger never
    config = GateConfig(min_score=0.0, min_gain=0.01, max_class_drop=0.1, min_rows=50)
    decision = decide(evaluation(challenger, targets), evaluation(champion, targets), config)
    assert not decision.promote and decision.gain_interval["low"] > 0
    assert any("class 9 Nuclear speckles F1 drops 1.0000" in r for r in decision.reasons)


def test_classes_absent_from_the_rows_do_not_block():
    targets, champion, challenger = pair(200, 200)
    champion[:, 9] = True  # a false positive class the challenger stops predicting: no support
    config = GateConfig(min_score=0.0, min_gain=0.01, max_class_drop=0.1, min_rows=50)
    assert decide(evaluation(challenger, targets), evaluation(champion, targets), config).promote


def test_refuses_evaluations_from_different_rows():
    targets, champion, challenger = pair(60, 30)
    other = evaluation(champion, targets, ids=[f"x{i}" for i in range(60)])
    with pytest.raises(EvidenceRefused, match="different rows") as refused:
        decide(evaluation(challenger, targets), other, CONFIG)
    from prefect.states import Failed

    from tasks.retry import retry_transient

    assert retry_transient(None, None, Failed(data=refused.value)) is False  # a retry compares the same again


def test_the_artifact_shows_the_interval_and_the_rows():
    targets, champion, challenger = pair(200, 120)
    config = GateConfig(min_score=0.0, max_class_drop=1.0)
    decision = decide(evaluation(challenger, targets), evaluation(champion, targets), config).to_dict()
    text = gate_markdown(decision, "new", "old")
    interval = decision["gain_interval"]
    assert f"95% interval [{interval['low']:+.4f}, {interval['high']:+.4f}]" in text
    assert "paired bootstrap, 1000 resamples over 200 images" in text
    assert "- rows: 200 (test rows)" in text


@pytest.mark.parametrize("field, value", [("min_rows", 0), ("resamples", 10), ("confidence", 1.0)])
def test_gate_config_refuses_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        GateConfig(**{field: value})
