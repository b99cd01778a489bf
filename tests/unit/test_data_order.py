"""The champion's data never goes backwards (protein.evaluation.data_order): pure cases."""

from __future__ import annotations

from typing import Any

from protein.evaluation.data_order import DataOrder, judge_data_order

PROMOTE: dict[str, Any] = {"promote": True, "reasons": ["f1_samples 0.8 clears the minimum 0.5"]}


def test_a_challenger_on_older_data_is_not_promoted_and_the_record_says_why() -> None:
    judged = judge_data_order(PROMOTE, DataOrder("latest", challenger_sequence=2, champion_sequence=5))
    assert judged["promote"] is False
    assert "push #2 on channel 'latest', older than the champion's push #5" in judged["reasons"][-1]
    assert "never goes backwards" in judged["reasons"][-1]
    assert judged["data_order"]["backwards"] is True
    assert PROMOTE["promote"] is True and len(PROMOTE["reasons"]) == 1, "the gate's own decision is not mutated"


def test_a_person_may_promote_older_data_and_the_promotion_names_them() -> None:
    order = DataOrder("latest", 2, 5, allow_older=True, allowed_by="prefect-flow-run:abc")
    judged = judge_data_order(PROMOTE, order)
    assert judged["promote"] is True
    assert judged["reasons"][-1].endswith("allowed by prefect-flow-run:abc (allow_older_data)")


def test_newer_same_or_unknown_data_leaves_the_decision_as_the_gate_made_it() -> None:
    for challenger, champion in ((5, 2), (3, 3), (None, 4), (2, None)):
        judged = judge_data_order(PROMOTE, DataOrder("latest", challenger, champion))
        assert judged["promote"] is True and judged["reasons"] == PROMOTE["reasons"], (challenger, champion)
