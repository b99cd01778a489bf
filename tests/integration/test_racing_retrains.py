"""Two retrains racing on one store leave one line of champion history."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from typing import Any

import pytest

from flows.params import TrainParams
from protein.config import TrainConfig
from protein.evaluation.gated_data import config_digest, gated_key
from protein.pipeline import train_and_register
from protein.registry import Registry
from protein.storage import open_store
from tests.integration.reliability_common import IMAGE, LENIENT, VALIDATION

pytestmark = pytest.mark.integration


def assert_history_is_one_line(store_uri: str) -> list[dict[str, Any]]:
    """Each promotion replaced the champion before it, and passed the gate against that champion."""
    store = open_store(store_uri)
    history = Registry(store).champion().history
    previous = None
    for event in history:
        assert event["action"] == "promote"
        assert event["previous"] == previous, history
        if previous is not None:  # the seeded first champion had no gate
            gate = json.loads(store.get_bytes(f"gates/{event['model_id']}.json"))
            assert gate["decision"]["promote"] is True and gate["champion"] == previous, gate
        previous = event["model_id"]
    assert Registry(store).champion().champion == previous
    return history


def promote_attempts(flow_run_id: Any) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    [promote] = [r for r in runs if r.name.startswith("promote-model")]
    return promote.run_count


def test_two_retrains_racing_on_one_store_leave_one_line_of_history(
    prefect_harness, small_dataset, tmp_path, isolated_cache, single_torch_thread, monkeypatch
):
    import flows.retrain as retrain_module

    store = str(tmp_path / "store")
    seeded = train_and_register(small_dataset, store, TrainConfig(image_size=IMAGE, epochs=1, batch_size=8, seed=9),
                                run_id="seed-run")["model_id"]
    Registry(open_store(store)).promote(seeded, expected_champion=None)

    # Both runs judge their challenger against the same champion before either promotes: the
    # interleaving that makes a naive read-then-write promotion lose an update.
    both_gated = threading.Barrier(2, timeout=180)
    promote_task = retrain_module.promote_model

    def promote_after_both_gates(*args: Any, **kwargs: Any) -> dict[str, Any]:
        both_gated.wait()
        return promote_task(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "promote_model", promote_after_both_gates)

    def run(lr: float) -> Any:
        # The champion's seed, hence its split: the gate then has its whole holdout to compare on
        # (with another split almost every holdout row is one the champion trained on).
        return retrain_module.retrain(data=str(small_dataset), store=store, train=TrainParams(
            epochs=1, image_size=IMAGE, batch_size=8, seed=9, lr=lr), gate_config=LENIENT, validation=VALIDATION,
            return_state=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        states = list(pool.map(run, [1e-3, 2e-3]))

    won = [s for s in states if s.is_completed()]
    lost = [s for s in states if s.is_failed()]
    assert len(won) == 1 and len(lost) == 1, [s.message for s in states]
    assert "PromotionConflict" in lost[0].message and "nothing was changed" in lost[0].message
    assert promote_attempts(lost[0].state_details.flow_run_id) == 1  # a lost swap is a decision: no retry
    winner = won[0].result()
    history = assert_history_is_one_line(store)
    assert [(e["model_id"], e["previous"]) for e in history] == [(seeded, None), (winner["challenger"], seeded)]

    # The loser's challenger stays a complete, immutable version that never served; gc keeps it.
    registry = Registry(open_store(store))
    losers = set(registry.versions()) - {seeded, winner["challenger"]}
    assert len(losers) == 1 and registry.orphans() == []

    # Its gate passed, its promotion did not land: its records say so, and its data and config are
    # no longer marked judged (a scheduled run would have skipped them as "promoted" for ever).
    [loser] = losers
    assert f"the gate passed {loser}, which does not serve" in lost[0].message
    gates = open_store(store)
    loser_gate = json.loads(gates.get_bytes(f"gates/{loser}.json"))
    assert loser_gate["decision"]["promote"] is True and loser_gate["promotion"]["landed"] is False
    assert "PromotionConflict" not in loser_gate["promotion"]["why"] and "expected" in loser_gate["promotion"]["why"]

    def judged(version: str) -> bool:
        spec = registry.spec(version)
        key = gated_key(spec["data_fingerprint"], config_digest(spec["train_config"]))
        return gates.exists(key) and json.loads(gates.get_bytes(key)).get("challenger") == version  # not withdrawn

    assert not judged(loser) and judged(winner["challenger"])
