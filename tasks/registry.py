from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from protein.links import object_uri
from protein.registry import Registry, newest_promotion
from protein.storage import open_store
from protein.validation.reference import move_champion
from tasks import events
from tasks.retry import retry_transient


def prefect_actor() -> str | None:
    """The flow run that acts, recorded in registry events (None outside a flow run: user@host)."""
    run_id = flow_run.id
    return f"prefect-flow-run:{run_id}" if run_id else None


@task(name="current-champion", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def current_champion(store: str) -> str | None:
    return Registry(open_store(store)).champion().champion


@task(name="find-run-model", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def find_run_model(store: str, run_id: str) -> str | None:
    return Registry(open_store(store)).find_by_run(run_id)


@task(name="promote-model", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def promote_model(store: str, model_id: str, expected_champion: str | None, reason: str,
                  decision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move the champion pointer (compare-and-swap); ``decision`` is the gate's, reported in the
    protein.model.promoted event once the pointer has moved (and again by report_promotion_again
    when this attempt stopped before it was sent)."""
    # A lost compare-and-swap (PromotionConflict) is a decision, not a fault: retry_transient never
    # retries it. Transient store faults are retried safely: the task run id is the same on every retry of
    # this task, so a retry after the promotion landed (its answer lost) finds this event id in the history
    # and succeeds instead of conflicting.
    registry = Registry(open_store(store), actor=prefect_actor())
    # The champion's training data becomes the drift reference for the next validation: pointer and
    # reference move as one step (the reference first; put back if the promotion does not land).
    state, reference = move_champion(registry.store, model_id, lambda: registry.promote(
        model_id, expected_champion=expected_champion, reason=reason,
        event_id=str(task_run.id) if task_run.id else None))
    # The event before the artifact: an artifact that cannot be created (an API outage past the retries)
    # failed the task after the pointer moved, and a rerun finds the challenger served, so no promotion
    # alert ever fired for that change of champion.
    promotion = newest_promotion(state.history, model_id)
    decision = decision or {}
    events.gate_decided(model_id, expected_champion, store, True, decision.get("challenger_score"),
                        decision.get("champion_score"), decision.get("reasons", [reason]), decision.get("dataset"),
                        events.promotion_event_id(promotion["event_id"]) if promotion else None)
    # The store URI, not a presigned URL: a signed link would sit in the Prefect database long after
    # it expired, and it names the access key id.
    uri = object_uri(registry.store, f"models/{model_id}/model.json")
    create_markdown_artifact(f"Champion is now `{model_id}` (was `{expected_champion or 'none'}`): `{uri}`",
                             key="champion-model",
                             description=f"the model version now serving; open with `protein link {uri}`")
    return {"champion": state.champion, "previous": expected_champion, "history_length": len(state.history),
            "reference_profile": reference}


@task(name="report-promotion-again", cache_policy=NO_CACHE)
def report_promotion_again(store: str, model_id: str, decision: dict[str, Any]) -> bool:
    """The protein.model.promoted event of a promotion an earlier attempt of this run made, sent
    again unless the server holds it (True: sent). That attempt may have stopped before it reached
    the server (its process died with the event queued), and this attempt, finding the challenger
    served, does not promote. The id is the promotion's own (promotion_event_id), so a copy of an
    event still on its way is dropped by the server rather than alerting twice."""
    record_id = decision.get("promotion_event_id")
    if not record_id:  # a promotion recorded without an id: nothing to tell a report sent again by
        return False
    event_id = events.promotion_event_id(record_id)
    if events.event_received(event_id):
        return False
    return events.gate_decided(model_id, decision.get("judged_against"), store, True,
                               decision.get("challenger_score"), decision.get("champion_score"),
                               decision.get("reasons", []), decision.get("dataset"), event_id)
