import pytest

from protein.config import GateConfig
from protein.gate import decide


def evaluation(score, f1s, support=None, holdout=None):
    return {"f1_samples": score, "per_class": {"f1": f1s, "support": support or [5] * len(f1s)},
            "holdout": holdout or {"fraction": 0.2, "seed": 0, "n_holdout": 10}}


CONFIG = GateConfig(min_score=0.5, min_gain=0.01, max_class_drop=0.1)


def test_first_model_promotes_if_it_clears_the_minimum():
    assert decide(evaluation(0.6, [0.6] * 10), None, CONFIG).promote
    rejected = decide(evaluation(0.4, [0.4] * 10), None, CONFIG)
    assert not rejected.promote and "below the minimum" in rejected.reasons[0]


def test_needs_the_minimum_gain():
    decision = decide(evaluation(0.705, [0.7] * 10), evaluation(0.70, [0.7] * 10), CONFIG)
    assert not decision.promote
    assert decision.gain == pytest.approx(0.005)
    assert any("below the required" in r for r in decision.reasons)
    assert decide(evaluation(0.72, [0.7] * 10), evaluation(0.70, [0.7] * 10), CONFIG).promote


def test_a_class_collapse_blocks_promotion_even_with_overall_gain():
    better_but_drops = [0.9] * 9 + [0.45]
    decision = decide(evaluation(0.8, better_but_drops), evaluation(0.7, [0.6] * 10), CONFIG)
    assert not decision.promote
    assert any("class 9 Nuclear speckles F1 drops 0.1500" in r for r in decision.reasons)


def test_classes_absent_from_the_holdout_do_not_block():
    support = [5] * 9 + [0]
    decision = decide(evaluation(0.8, [0.9] * 9 + [0.0], support), evaluation(0.7, [0.6] * 9 + [0.5], support),
                      CONFIG)
    assert decision.promote


def test_refuses_evaluations_from_different_holdouts():
    other = evaluation(0.7, [0.7] * 10, holdout={"fraction": 0.3, "seed": 0, "n_holdout": 15})
    with pytest.raises(ValueError, match="different holdouts"):
        decide(evaluation(0.8, [0.8] * 10), other, CONFIG)
