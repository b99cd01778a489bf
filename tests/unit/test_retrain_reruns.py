"""What a rerun of a retrain (Retry in the UI, Prefect's retries, a rescheduled run) decides for a
challenger an earlier attempt of the same run already gated: never a second gate, never a promotion
over a rollback made since, and the promotion an interrupted attempt had passed but not made."""

from __future__ import annotations

from pathlib import Path
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


# The champion's history as the registry records it: c served before, then p, then c again (r-3).
HISTORY = [{"event_id": "r-1", "action": "promote", "model_id": "c", "previous": None},
           {"event_id": "r-2", "action": "promote", "model_id": "p", "previous": "c"},
           {"event_id": "r-3", "action": "promote", "model_id": "c", "previous": "p"}]


def test_the_promotion_event_is_sent_even_when_the_champion_artifact_cannot_be_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pointer moved, then the artifact failed past its retries: the event was never sent, and a
    rerun finds the challenger served and promotes nothing, so no promotion alert fired at all."""
    import tasks.registry as registry_tasks
    from protein.registry import ChampionState
    from tasks import events

    sent: list[tuple[Any, ...]] = []

    def api_down(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("creating the champion-model artifact: the Prefect API is down")

    monkeypatch.setattr(registry_tasks, "move_champion",
                        lambda store, model_id, promote: (ChampionState("c", HISTORY, "etag"), None))
    monkeypatch.setattr(events, "gate_decided", lambda *args: sent.append(args) or True)
    monkeypatch.setattr(registry_tasks, "create_markdown_artifact", api_down)
    store = str(tmp_path / "store")
    with pytest.raises(RuntimeError, match="champion-model artifact"):
        registry_tasks.promote_model.fn(store, "c", "p", "gain", {"reasons": ["gain 0.02 clears 0.005"]})
    assert [args[:4] for args in sent] == [("c", "p", store, True)]
    assert sent[0][-1] == events.promotion_event_id("r-3")  # the promotion that just landed, not c's first


@pytest.mark.parametrize("on_the_server", [False, True], ids=["lost", "received"])
def test_a_rerun_finding_its_challenger_served_sends_its_promotion_again_unless_the_server_has_it(
        on_the_server: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The earlier attempt died with its event queued; this one does not promote. The event goes again
    under the promotion's own id, which the server holds at most once."""
    from tasks import events
    from tasks.registry import report_promotion_again

    asked: list[Any] = []
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(events, "event_received", lambda event_id: asked.append(event_id) or on_the_server)
    monkeypatch.setattr(events, "gate_decided", lambda *args: sent.append(args) or True)
    decision = decision_of_an_earlier_attempt("c", "c", {**earlier(True, served=True), "promotion_event_id": "r-3"})
    assert report_promotion_again.fn("s3://b/models", "c", decision) is not on_the_server
    assert asked == [events.promotion_event_id("r-3")]
    assert [(args[:4], args[-1]) for args in sent] == ([] if on_the_server else [
        (("c", "p", "s3://b/models", True), events.promotion_event_id("r-3"))])


def test_a_rerun_of_a_retrain_that_promoted_reports_the_promotion_and_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retrain itself, its other steps played by stand-ins: the earlier attempt promoted c."""
    import logging
    import uuid
    from types import SimpleNamespace

    import flows.retrain as retrain

    reported: list[tuple[Any, ...]] = []

    def not_again(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a served challenger was gated or promoted again")

    monkeypatch.setattr(retrain, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(retrain, "flow_run", SimpleNamespace(id=uuid.uuid4(), parameters={}, run_count=2))
    monkeypatch.setattr(retrain, "definition_gate_of_this_run", lambda: None)
    monkeypatch.setattr(retrain, "resolve_dataset", lambda *args: {"uri": "d", "channel": None,
                                                                    "trigger_sequence": None, "fingerprint": None})
    monkeypatch.setattr(retrain, "current_champion", lambda store: "c")
    monkeypatch.setattr(retrain, "validate_data", lambda *args: {"data_fingerprint": "f" * 64, "success": True,
                                                                 "report_uri": None, "failures": []})
    monkeypatch.setattr(retrain, "train_model", lambda *args, **kwargs: {"model_id": "c"})
    monkeypatch.setattr(retrain, "earlier_gate_decision",
                        lambda store, challenger: {**earlier(True, served=True), "promotion_event_id": "r-3"})
    monkeypatch.setattr(retrain, "report_promotion_again", lambda *args: reported.append(args) or True)
    monkeypatch.setattr(retrain, "submission_uri", lambda *args: "s3://b/submission.csv")
    monkeypatch.setattr(retrain, "publish_run_summary", lambda summary: None)
    for step in ("gate_evaluation", "gate", "promote_model"):
        monkeypatch.setattr(retrain, step, not_again)
    result = retrain.retrain.fn(data="d", store=str(tmp_path))
    assert result["promoted"] is True and result["submission"] == "s3://b/submission.csv", result
    assert [(args[:2], args[2]["promotion_event_id"]) for args in reported] == [((str(tmp_path), "c"), "r-3")]
