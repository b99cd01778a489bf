from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from protein.errors import PromotionConflict
from protein.registry import Registry
from protein.storage import open_store
from protein.validation import write_reference_profile


@task(name="current-champion", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def current_champion(store: str) -> str | None:
    return Registry(open_store(store)).champion().champion


@task(name="find-run-model", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def find_run_model(store: str, run_id: str) -> str | None:
    return Registry(open_store(store)).find_by_run(run_id)


def retry_unless_conflict(task: object, task_run: object, state: State) -> bool:
    """A lost compare-and-swap is a decision, not a transient fault: never retry it."""
    return not isinstance(state.result(raise_on_failure=False), PromotionConflict)


@task(name="promote-model", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_conflict)
def promote_model(store: str, model_id: str, expected_champion: str | None, reason: str) -> dict[str, Any]:
    registry = Registry(open_store(store))
    state = registry.promote(model_id, expected_champion=expected_champion, reason=reason)
    # The champion's training data becomes the drift reference for the next validation.
    reference = write_reference_profile(registry.store, model_id)
    create_link_artifact(registry.store.url(f"models/{model_id}/model.json"), link_text=f"champion {model_id}",
                         key="champion-model", description="the model version now serving")
    return {"champion": state.champion, "previous": expected_champion, "history_length": len(state.history),
            "reference_profile": reference}
