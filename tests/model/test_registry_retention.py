"""Collection never deletes what is live: named objects, young runs, registrations in flight, and versions
being promoted. Races run on the local store and on the moto S3 server, both orders forced and free."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from protein.cli import main
from protein.errors import PromotionConflict, RegistryError
from protein.registry import CHAMPION_KEY, Registry
from protein.registry.records import tombstone_key
from protein.storage import LocalStore
from tests.model.test_registry import add_version


class PausingStore:
    """A real store that stops before one call on one key until released, so that one interleaving of two
    threads happens every time (timing alone would hit it only by chance)."""

    def __init__(self, inner: Any, method: str, key: str) -> None:
        self._inner, self._method, self._key = inner, method, key
        self.uri = inner.uri
        self.reached, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def paused(key: str, *args: Any, **kwargs: Any) -> Any:
            if key == self._key and not self.reached.is_set():
                self.reached.set()
                assert self.release.wait(120), "never released"
            return attr(key, *args, **kwargs)

        return paused


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test, which asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def age(store: LocalStore, prefix: str, seconds: float) -> None:
    then = time.time() - seconds
    for key in store.list(prefix):
        os.utime(store.root / key, (then, then))


# --- what gc --runs keeps -------------------------------------------------------------------------------


@pytest.mark.integration
def test_gc_runs_keeps_what_a_live_version_names(any_registry, trained, capsys):
    registry = any_registry
    probs = "runs/r-live/holdout_probs.npz"
    add_version(registry, trained["model_id"], "live", run_id="r-live",
                holdout={"fraction": 0.2, "seed": 0, "fold": 1, "folds": 5, "probs_key": probs})
    registry.store.put_bytes("runs/r-live/checkpoint.pt", b"ckpt")
    registry.store.put_bytes(probs, b"probabilities")
    assert main(["models", "gc", "--runs", "--run-min-age-hours", "0", "--store", registry.store.uri]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == ["r-live"] and "runs/r-live/holdout_probs.npz" in result["runs_kept"]["r-live"]
    assert registry.store.list("runs/") == [probs]


def claim(store: LocalStore, run: str, version: str) -> None:
    store.put_bytes(f"registry/runs/claims/{run}.json", json.dumps({"run_id": run, "model_id": version}).encode())


IN_PROGRESS = "its registration is in progress (claimed, not yet indexed)"


def test_gc_runs_has_an_age_guard_and_skips_registrations_in_flight(registry, trained, capsys):
    store = registry.store
    add_version(registry, trained["model_id"], "fresh", run_id="r-fresh")
    store.put_bytes("runs/r-fresh/checkpoint.pt", b"ckpt")  # registered an hour ago: within the guard
    age(store, "runs/r-fresh/", 3600)
    # Trained 10 days ago, claimed just now: the registration may be uploading.
    store.put_bytes("runs/r-claimed/checkpoint.pt", b"ckpt")
    claim(store, "r-claimed", "pending")
    age(store, "runs/r-claimed/", 10 * 86400)
    # Claimed 10 days ago, but its version has weights (incomplete, not yet collected): it got that far.
    store.put_bytes("runs/r-uploaded/checkpoint.pt", b"ckpt")
    claim(store, "r-uploaded", "uploaded")
    store.put_bytes("models/uploaded/model.safetensors", b"weights")
    age(store, "runs/r-uploaded/", 10 * 86400)
    age(store, "registry/runs/claims/r-uploaded.json", 10 * 86400)
    assert main(["models", "gc", "--runs", "--store", store.uri]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == [] and result["abandoned_claims"] == []
    assert result["runs_kept"]["r-fresh"].startswith("touched 3")
    assert result["runs_kept"]["r-claimed"] == IN_PROGRESS
    assert result["runs_kept"]["r-uploaded"] == IN_PROGRESS
    assert store.list("runs/") == ["runs/r-claimed/checkpoint.pt", "runs/r-fresh/checkpoint.pt",
                                   "runs/r-uploaded/checkpoint.pt"]
    assert store.list("registry/runs/claims/") == ["registry/runs/claims/r-claimed.json",
                                                   "registry/runs/claims/r-fresh.json",
                                                   "registry/runs/claims/r-uploaded.json"]


def test_gc_runs_collects_the_run_of_an_abandoned_claim(registry, capsys):
    """A registration that failed after its claim (S3 down past every retry, the host killed) and that
    nobody retried (the next retrain gets a new run id): once gc collected its incomplete version, the
    claim names nothing. Older than --run-age-days, it no longer pins the run: run and claim go."""
    store = registry.store
    store.put_bytes("runs/r-failed/checkpoint.pt", b"ckpt")
    store.put_bytes("runs/r-failed/metrics.jsonl", b"{}")
    claim(store, "r-failed", "never-landed")
    claim(store, "r-local", "never-landed-either")  # trained off the store: a claim and nothing else
    store.put_bytes("runs/r-recent/checkpoint.pt", b"ckpt")  # claimed 2 days ago: not yet abandoned
    claim(store, "r-recent", "still-young")
    age(store, "runs/", 10 * 86400)
    age(store, "registry/runs/claims/", 10 * 86400)
    age(store, "registry/runs/claims/r-recent.json", 2 * 86400)
    assert main(["models", "gc", "--runs", "--store", store.uri]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == ["r-failed"] and result["abandoned_claims"] == ["r-failed", "r-local"]
    assert result["runs_kept"] == {"r-recent": IN_PROGRESS}
    assert store.list("runs/") == ["runs/r-recent/checkpoint.pt"]
    assert store.list("registry/runs/claims/") == ["registry/runs/claims/r-recent.json"]


def test_gc_runs_keeps_an_abandoned_claim_whose_registration_resumed_since_the_plan(registry):
    store = registry.store
    store.put_bytes("runs/r-late/checkpoint.pt", b"ckpt")
    claim(store, "r-late", "late")
    age(store, "runs/", 10 * 86400)
    age(store, "registry/runs/claims/", 10 * 86400)
    plan = registry.plan_gc(runs=True)
    assert plan.claims == {"r-late": "late"} and list(plan.runs) == ["r-late"]
    store.put_bytes("models/late/model.safetensors", b"weights")  # a retry of the registration uploads
    registry.apply_gc(plan)
    assert store.exists("runs/r-late/checkpoint.pt") and store.exists("registry/runs/claims/r-late.json")


def test_gc_runs_collects_the_run_of_a_deleted_version(registry, trained, capsys):
    """A deleted version's run keeps its registration claim (a retry must never register the
    deleted id again) but loses its index entry: it is collected, not kept for ever as "in progress"."""
    store = registry.store
    add_version(registry, trained["model_id"], "gone", run_id="r-gone")
    store.put_bytes("runs/r-gone/checkpoint.pt", b"ckpt")
    registry.delete_version("gone")
    store.put_bytes("runs/r-pending/checkpoint.pt", b"ckpt")  # claimed for a version not yet written
    claim(store, "r-pending", "pending")
    age(store, "runs/", 10 * 86400)
    assert main(["models", "gc", "--runs", "--store", store.uri]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == ["r-gone"]
    assert result["runs_kept"] == {"r-pending": IN_PROGRESS}
    assert store.list("runs/") == ["runs/r-pending/checkpoint.pt"]
    assert store.exists("registry/runs/claims/r-gone.json")  # still refuses a retry's registration


def test_gc_runs_rechecks_a_run_before_deleting_it(registry, trained):
    store = registry.store
    add_version(registry, trained["model_id"], "done", run_id="r-done")
    store.put_bytes("runs/r-done/checkpoint.pt", b"ckpt")
    age(store, "runs/r-done/", 2 * 86400)
    plan = registry.plan_gc(runs=True)
    assert plan.runs == {"r-done": ["runs/r-done/checkpoint.pt"]}
    store.put_bytes("runs/r-done/checkpoint.pt", b"resumed")  # a retrain resumed the run since the plan
    registry.apply_gc(plan)
    assert store.get_bytes("runs/r-done/checkpoint.pt") == b"resumed"


# --- orphans vs registration ----------------------------------------------------------------------------


def test_orphan_collection_rechecks_before_deleting(registry, trained, tmp_path):
    local = registry.download(trained["model_id"], tmp_path / "dl")
    registry.store.put_file("models/slow/model.safetensors", local / "model.safetensors", if_none_match=True)
    plan = registry.plan_gc(older_than_s=0)
    assert list(plan.orphans) == ["slow"]
    spec = json.loads((local / "model.json").read_text())
    registry.store.put_bytes("models/slow/model.json", json.dumps({**spec, "id": "slow"}).encode())
    registry.apply_gc(plan)
    assert registry.resolve("slow") == "slow"


@pytest.mark.integration
def test_a_registration_whose_weights_gc_collected_midway_is_whole(any_registry, trained, tmp_path):
    registry = any_registry
    local = registry.download(trained["model_id"], tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    fields = {k: spec[k] for k in ("arch", "image_size", "class_names", "thresholds", "metrics")}
    pausing = PausingStore(registry.store, "put_bytes", "models/racing/model.json")
    thread, outcome = in_thread(lambda: Registry(pausing).register(local / "model.safetensors", fields,
                                                                  version="racing"))
    assert pausing.reached.wait(60)
    registry.apply_gc(registry.plan_gc(older_than_s=0))  # the weights look like an orphan right now
    assert registry.store.list("models/racing/") == []
    pausing.release.set()
    thread.join(60)
    assert outcome == {"value": "racing"}
    assert registry.resolve("racing") == "racing"


# --- delete vs promote ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_promotion_racing_a_delete_is_undone(any_registry, trained):
    registry, v = any_registry, trained["model_id"]
    registry.promote(v, expected_champion=None)
    add_version(registry, v, "victim")
    # The promotion passed its checks and is about to swap; the delete runs to the end in between.
    pausing = PausingStore(registry.store, "put_bytes", CHAMPION_KEY)
    thread, outcome = in_thread(lambda: Registry(pausing).promote("victim", expected_champion=v))
    assert pausing.reached.wait(60)
    registry.delete_version("victim")
    pausing.release.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), PromotionConflict), outcome
    assert "model version victim was being deleted" in str(outcome["error"])
    state = registry.champion()
    assert state.champion == v and registry.resolve("champion") == v
    assert [e["action"] for e in state.history] == ["promote", "promote", "rollback"]
    assert "victim" not in registry.versions()


@pytest.mark.integration
def test_a_delete_racing_a_promotion_is_refused(any_registry, trained):
    registry, v = any_registry, trained["model_id"]
    registry.promote(v, expected_champion=None)
    add_version(registry, v, "victim")
    # The delete checked the history and is about to tombstone; the promotion lands in between.
    pausing = PausingStore(registry.store, "put_bytes", tombstone_key("victim"))
    thread, outcome = in_thread(lambda: Registry(pausing).delete_version("victim"))
    assert pausing.reached.wait(60)
    registry.promote("victim", expected_champion=v)
    pausing.release.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), RegistryError), outcome
    assert str(outcome["error"]) == "model version victim was promoted while it was being deleted; kept"
    assert registry.resolve("champion") == "victim"
    assert not registry.store.exists(tombstone_key("victim"))


@pytest.mark.integration
def test_free_running_promote_and_delete_never_both_win(any_registry, trained):
    registry, v = any_registry, trained["model_id"]
    registry.promote(v, expected_champion=None)
    for round_ in range(4):
        victim = add_version(registry, v, f"victim-{round_}")
        champion = registry.champion().champion
        barrier = threading.Barrier(2)

        def promote(victim: str = victim, champion: str | None = champion,
                    barrier: threading.Barrier = barrier) -> Any:
            barrier.wait(30)
            return Registry(registry.store).promote(victim, expected_champion=champion)

        def delete(victim: str = victim, barrier: threading.Barrier = barrier) -> Any:
            barrier.wait(30)
            return Registry(registry.store).delete_version(victim)

        (p, promoted), (d, deleted) = in_thread(promote), in_thread(delete)
        p.join(120)
        d.join(120)
        for outcome in (promoted, deleted):
            error = outcome.get("error")
            assert error is None or isinstance(error, RegistryError), repr(error)  # PromotionConflict included
        assert not ("value" in promoted and "value" in deleted), (round_, promoted, deleted)
        now = registry.resolve("champion")  # never a deleted version
        assert (now == victim) == ("value" in promoted)
        assert (victim in registry.versions()) != ("value" in deleted)


@pytest.mark.integration
def test_free_running_gc_never_breaks_a_registration(any_registry, trained, tmp_path):
    # gc runs in a loop beside registrations, with a 3 s threshold for incomplete versions; the orphans
    # seeded before are past it and must go, every registration must come out whole. (A registration
    # that stalls longer than the threshold between its weights and its model.json is the residual
    # window docs/reliability.md names; production's threshold is an hour.)
    registry = any_registry
    local = registry.download(trained["model_id"], tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    fields = {k: spec[k] for k in ("arch", "image_size", "class_names", "thresholds", "metrics")}
    for i in range(3):
        registry.store.put_bytes(f"models/crashed-{i}/model.safetensors", b"half")
    time.sleep(3.5)
    stop = threading.Event()

    def collect() -> int:
        rounds = 0
        while not stop.is_set():
            registry.apply_gc(registry.plan_gc(older_than_s=3.0))
            rounds += 1
        return rounds

    gc_thread, gc_outcome = in_thread(collect)
    try:
        registered = [Registry(registry.store).register(local / "model.safetensors", {**fields, "run_id": f"r{i}"},
                                                        version=f"raced-{i}") for i in range(4)]
    finally:
        stop.set()
        gc_thread.join(120)
    assert "error" not in gc_outcome and gc_outcome["value"] >= 1, gc_outcome
    for version in registered:
        assert registry.resolve(version) == version
    assert registry.orphans() == []


@pytest.mark.integration
def test_a_gc_host_whose_clock_runs_fast_collects_no_registration_in_progress(s3_bucket, monkeypatch):
    """Ages are measured on the store's clock (S3's Date header), which stamps LastModified: a host two
    hours fast would otherwise see weights uploaded a moment ago as an hour-old orphan."""
    from protein.storage import open_store

    store = open_store(s3_bucket)
    registry = Registry(store)
    store.put_bytes("models/20261207-000000-in-progress/model.safetensors", b"weights being registered")
    store.put_bytes("runs/r-live/checkpoint.pt", b"an epoch ago")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 2 * 3600)
    plan = registry.plan_gc(older_than_s=3600, runs=True, run_age_s=3600, run_min_age_s=3600)
    assert not plan.orphans and not plan.runs
    assert "r-live" in plan.kept
