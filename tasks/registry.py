from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from protein.links import object_uri
from protein.registry import Registry
from protein.storage import open_store
from protein.validation import write_reference_profile
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
    protein.model.promoted event once the pointer has moved."""
    # A lost compare-and-swap (PromotionConflict) is a decision, not a fault: retry_transient never
    # retries it. Transient store faults are retried safely: the task run id is the same on every retry of
    # this task, so a retry after the promotion landed (its answer lost) finds this event id in the history
    # and succeeds instead of conflicting.
    registry = Registry(open_store(store), actor=prefect_actor())
    state = registry.promote(model_id, expected_champion=expected_champion, reason=reason,
                             event_id=str(task_run.id) if task_run.id else None)
    # The champion's training data becomes the drift reference for the next validation.
    reference = write_reference_profile(registry.store, model_id)
    # The store URI, not a presigned URL: a signed link would sit in the Prefect database long after
    # it expired, and it names the access key id.
    uri = object_uri(registry.store, f"models/{model_id}/model.json")
    create_markdown_artifact(f"Champion is now `{model_id}` (was `{expected_champion or 'none'}`): `{uri}`",
                             key="champion-model",
                             description=f"the model version now serving; open with `protein link {uri}`")
    decision = decision or {}
    events.gate_decided(model_id, expected_champion, store, True, decision.get("challenger_score"),
                        decision.get("champion_score"), decision.get("reasons", [reason]), decision.get("dataset"))
    return {"champion": state.champion, "previous": expected_champion, "history_length": len(state.history),
            "reference_profile": reference}
