"""What a rerun of a retrain (Retry in the UI, Prefect's retries, a rescheduled run) decides for a
challenger an earlier attempt of the same run already gated: never a second gate, never a promotion
over a rollback made since, and the promotion an interrupted attempt had passed but not made."""

from __future__ import annotations

from typing import Any

import pytest

from flows.retrain import decision_of_an_earlier_attempt


def earlier(promote: bool, served: bool, judged_against: str | None = "p",
            landed: bool | None = None) -> dict[str, Any]:
    return {"promote": promote, "reasons": ["gain 0.02 clears 0.005"], "challenger_score": 0.6,
            "champion_score": 0.58, "metric": "f1_samples", "record_uri": "file:///s/gates/c.json",
            "served": served, "judged_against": judged_against,
            "promotion": None if landed is None else {"landed": landed, "why": "lost"}}


@pytest.mark.parametrize(("champion", "record", "promote", "promote_now", "why"), [
    # Promoted by the earlier attempt, which then stopped (its submission failed): go on to it.
    ("c", earlier(True, served=True), True, False, "was promoted by an earlier attempt of this run; this attempt"),
    # Promoted earlier, then an operator rolled back (or another run promoted): not promoted again.
    ("p", earlier(True, served=True), False, False, "and the champion is p now (rolled back or replaced since)"),
    # Passed against p, the champion still, but the attempt died before promoting: promote now.
    ("p", earlier(True, served=False), True, True, "against p, the champion still, and stopped before promoting"),
    # Passed against p, but another run promoted x since: a judgement of another champion.
    ("x", earlier(True, served=False), False, False, "but the champion is x now: not promoted on a judgement"),
    # Passed, but the earlier promotion lost its compare-and-swap: withdrawn, not retried.
    ("x", earlier(True, served=False, landed=False), False, False, "its promotion lost to another; not retried"),
    # Refused earlier: the same answer, not a second draw.
    ("p", earlier(False, served=False), False, False, "the gate refused c in an earlier attempt"),
])
def test_a_rerun_reuses_what_its_earlier_attempt_decided(champion: str, record: dict[str, Any], promote: bool,
                                                         promote_now: bool, why: str) -> None:
    decision = decision_of_an_earlier_attempt("c", champion, record)
    assert (decision["promote"], decision["promote_now"]) == (promote, promote_now)
    assert why in decision["reasons"][-1] and decision["reasons"][0] == "gain 0.02 clears 0.005"
    assert decision["record_uri"] == "file:///s/gates/c.json"  # the record it stands on, unchanged


def test_a_challenger_promoted_by_hand_is_not_gated_against_itself() -> None:
    decision = decision_of_an_earlier_attempt("c", "c", None)
    assert decision["promote"] is False and "promoted outside this run's gate" in decision["reasons"][0]


def test_the_retrains_submission_moves_latest_only_as_the_champion(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrain publishes the champion it read; another retrain may promote its own meanwhile
    (protein.pipeline.publish_submission's as_champion, tested in tests/unit/test_latest_submission.py)."""
    import flows.retrain as retrain
    from flows.params import DispatchParams

    asked: list[dict[str, Any]] = []
    monkeypatch.setattr(retrain, "predict_submission",
                        lambda *args, **kwargs: asked.append({"args": args, **kwargs}) or {"uri": "s3://b/s.csv"})
    assert retrain.submission_uri("d", "s", "run-1", "v1", "f" * 64, None, DispatchParams()) == "s3://b/s.csv"
    assert asked == [{"args": ("d", "s", "v1"), "as_champion": True, "expected_fingerprint": "f" * 64}]


def test_the_retrains_own_gate_scores_the_data_it_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset named directly can change during training: the gate and the submission refuse data
    other than what validation passed (FingerprintMismatch, tests/model/test_run_results.py)."""
    import flows.retrain as retrain
    from flows.params import DispatchParams

    asked: list[tuple[Any, ...]] = []
    monkeypatch.setattr(retrain, "evaluate_models", lambda *args: asked.append(args) or {})
    retrain.gate_evaluation("d", "s", "run-1", "c", "p", "f" * 64, None, DispatchParams())
    assert asked == [("d", "s", "c", "p", "f1_samples", "f" * 64)]
