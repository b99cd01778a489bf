import hashlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from protein.data import fingerprint, load_competition
from protein.errors import PromotionConflict, RegistryError
from protein.modeling.predict import Predictor
from protein.pipeline import evaluate_version, load_split_images, predict_and_publish
from protein.registry import CHAMPION_KEY, Registry, check_version_id, default_actor, run_index_key
from protein.storage import S3Store, open_store
from tests.helpers import TINY_ARCH


def test_model_version_is_self_describing(trained):
    spec = Registry(open_store(trained["store"])).spec(trained["model_id"])
    for field in ("arch", "image_size", "normalization", "class_names", "thresholds", "metrics", "data_fingerprint",
                  "train_config", "code_version", "created", "parent_champion", "weights_sha256"):
        assert field in spec, field
    assert spec["arch"] == TINY_ARCH and spec["image_size"] == 32 and len(spec["thresholds"]) == 10
    assert spec["train_config"]["epochs"] == 1
    assert spec["data_fingerprint"] == trained["data_fingerprint"]


def test_versions_are_immutable(registry, trained, tmp_path):
    with pytest.raises(RegistryError, match="already exists"):
        registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])


def add_version(registry: Registry, source: str, version: str, **extra) -> str:
    """Register ``source``'s weights again under another id (same bytes, new record)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = registry.download(source, Path(tmp))
        spec = json.loads((local / "model.json").read_text())
        fields = {k: spec[k] for k in ("arch", "image_size", "normalization", "class_names", "thresholds", "metrics")}
        return registry.register(local / "model.safetensors", {**fields, **extra}, version=version)


def test_promote_rollback_and_history(registry, trained):
    first = trained["model_id"]
    assert registry.champion().champion is None
    registry.promote(first, expected_champion=None, reason="first")
    second = add_version(registry, first, "second-version")
    registry.promote(second, expected_champion=first)
    assert registry.champion().champion == second
    state = registry.rollback(reason="bad deploy")
    assert state.champion == first
    actions = [(e["action"], e["model_id"], e["previous"]) for e in state.history]
    assert actions == [("promote", first, None), ("promote", second, first), ("rollback", first, second)]
    listing = {row["id"]: row["champion"] for row in registry.listing()}
    assert listing == {first: True, second: False}


def test_promotion_with_a_stale_expectation_fails_and_changes_nothing(registry, trained):
    registry.promote(trained["model_id"], expected_champion=None)
    before = registry.store.get_bytes(CHAMPION_KEY)
    with pytest.raises(PromotionConflict, match="expected none"):
        registry.promote(trained["model_id"], expected_champion=None)
    assert registry.store.get_bytes(CHAMPION_KEY) == before


def race_promotions(registry, version, n=6):
    barrier = threading.Barrier(n)
    outcomes = []

    def attempt():
        barrier.wait()
        try:
            registry.promote(version, expected_champion=None, reason=threading.current_thread().name)
            outcomes.append("won")
        except PromotionConflict as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every thread answered: one that died of another error (a torn read) recorded nothing.
    assert len(outcomes) == n, outcomes
    return outcomes


def test_racing_promotions_exactly_one_wins_local(registry, trained):
    outcomes = race_promotions(registry, trained["model_id"])
    assert outcomes.count("won") == 1
    assert all(re.search(r"champion .* expected", o) for o in outcomes if o != "won"), outcomes
    assert len(registry.champion().history) == 1


@pytest.mark.integration
def test_racing_promotions_exactly_one_wins_s3(trained, s3_bucket):
    registry = Registry(open_store(s3_bucket))
    registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    outcomes = race_promotions(registry, trained["model_id"])
    assert outcomes.count("won") == 1
    assert len(registry.champion().history) == 1


@pytest.mark.integration
def test_s3_round_trip_predicts_the_same_submission(trained, s3_bucket, tmp_path):
    local_out, s3_out = tmp_path / "local.csv", tmp_path / "s3.csv"
    local_registry = Registry(open_store(trained["store"]))
    # Predict straight from the local checkpoint folder.
    predictor = Predictor.from_checkpoint(local_registry.download(trained["model_id"], tmp_path / "dl"))
    data = load_competition(trained["data"])
    images = load_split_images(data, "test", predictor.image_size, fingerprint(data.source), tmp_path / "cache")
    predictor.submission(data.test_ids, images).to_csv(local_out, index=False)

    # Register in S3, promote, predict the champion from s3://.
    s3_registry = Registry(open_store(s3_bucket))
    s3_registry.import_version(local_registry, trained["model_id"])
    s3_registry.promote(trained["model_id"], expected_champion=None)
    published = predict_and_publish(trained["data"], s3_bucket, "champion", s3_out, tmp_path / "cache2")
    assert published["model_id"] == trained["model_id"]
    assert pd.read_csv(s3_out, dtype=str).equals(pd.read_csv(local_out, dtype=str))
    latest = json.loads(open_store(s3_bucket).get_bytes("submissions/latest.json"))
    assert latest["key"] == published["key"] and latest["key"].startswith(f"submissions/{trained['model_id']}/")
    assert open_store(s3_bucket).get_bytes(latest["key"]) == s3_out.read_bytes()


def test_unknown_version_lists_what_exists(registry, trained):
    with pytest.raises(RegistryError, match="unknown model version 'no-such-version'") as info:
        registry.spec("no-such-version")
    assert "no-such-version" in str(info.value) and trained["model_id"] in str(info.value)
    with pytest.raises(RegistryError, match="invalid model version"):
        registry.spec("../../etc")
    with pytest.raises(RegistryError, match="no champion yet"):
        registry.resolve("champion")


def test_tampered_weights_are_refused(registry, trained, tmp_path):
    weights = registry.store.root / "models" / trained["model_id"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"version {trained['model_id']}: weights refused .*checksum mismatch"):
        registry.download(trained["model_id"], tmp_path / "dl")
    assert not (tmp_path / "dl" / trained["model_id"] / "model.json").exists()


def test_model_json_claiming_another_architecture_is_refused(registry, trained, tmp_path):
    local = registry.download(trained["model_id"], tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    spec["arch"] = "resnet34"
    (local / "model.json").write_text(json.dumps(spec))
    with pytest.raises(RegistryError, match="do not match architecture 'resnet34'"):
        Predictor.from_checkpoint(local)


def test_evaluate_reports_holdout_metrics(trained):
    metrics = evaluate_version(trained["data"], trained["store"], trained["model_id"], cache_dir=trained["cache"])
    assert metrics["model_id"] == trained["model_id"]
    assert metrics["holdout"]["n_holdout"] == 8  # 20% of 40
    assert len(metrics["per_class"]["f1"]) == 10
    assert 0.0 <= metrics["f1_samples"] <= 1.0


def test_evaluating_on_another_split_leaves_out_the_rows_the_model_trained_on(trained):
    # --seed 7 or --holdout 0.9 drew rows the model trained on and still called them its holdout:
    # its f1 rose with every training row in the split.
    own = evaluate_version(trained["data"], trained["store"], trained["model_id"], cache_dir=trained["cache"])
    held_out = set(own["rows"]["ids"])
    for fraction, seed in ((None, 7), (0.9, None)):
        other = evaluate_version(trained["data"], trained["store"], trained["model_id"], holdout_fraction=fraction,
                                 seed=seed, cache_dir=trained["cache"])
        assert set(other["rows"]["ids"]) <= held_out and other["rows"]["excluded"] > 0, other["rows"]
        assert "did not train on" in other["rows"]["selection"]


def test_orphaned_version_is_listed_and_collected(registry, trained):
    registry.store.put_bytes("models/half-written/model.safetensors", b"partial")
    assert registry.orphans() == ["half-written"]
    assert "half-written" not in registry.versions()
    registry.delete_orphan("half-written")
    assert registry.orphans() == []
    with pytest.raises(RegistryError, match="is complete"):
        registry.delete_orphan(trained["model_id"])


def test_rerunning_a_finished_run_does_not_register_twice(trained):
    from protein.pipeline import train_and_register
    from tests.model.conftest import TINY_CONFIG

    before = Registry(open_store(trained["store"])).versions()
    again = train_and_register(trained["data"], trained["store"], TINY_CONFIG, run_id=trained["run_id"],
                               cache_dir=trained["cache"])
    assert again["model_id"] == trained["model_id"]
    assert Registry(open_store(trained["store"])).versions() == before


# --- integrity: weights bound to model.json -------------------------------------------------------------


def replace_weights(store, key: str, data: bytes, with_checksum: bool) -> None:
    """Rewrite a weights object behind the registry's back, with or without a matching recorded hash."""
    if isinstance(store, S3Store):
        import boto3

        metadata = {"sha256": hashlib.sha256(data).hexdigest()} if with_checksum else {}
        boto3.session.Session().client("s3").put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data,
                                                         Metadata=metadata)
    elif with_checksum:
        store.delete(key)
        store.put_bytes(key, data)  # a new object with its own, correct sidecar
    else:
        (store.root / key).write_bytes(data)
        (store.root / ".protein+meta" / "sha256" / key).unlink()


@pytest.mark.integration
@pytest.mark.parametrize("with_checksum", [True, False], ids=["with-checksum", "without-checksum"])
@pytest.mark.parametrize("how", ["replaced", "truncated"])
def test_weights_rewritten_in_the_bucket_are_refused_and_nothing_is_predicted(
    any_registry, trained, tmp_path, with_checksum, how
):
    registry, version = any_registry, trained["model_id"]
    registry.promote(version, expected_champion=None)
    key = f"models/{version}/model.safetensors"
    good = registry.store.get_bytes(key)
    bad = good[: len(good) // 2] if how == "truncated" else bytes(b ^ 0x5A for b in good)
    replace_weights(registry.store, key, bad, with_checksum)

    for call in (lambda: registry.download(version, tmp_path / "dl"), lambda: registry.promote(version),
                 lambda: registry.resolve("champion")):
        with pytest.raises(RegistryError, match=f"^model version {re.escape(version)}: weights") as info:
            call()
        message = str(info.value)
        assert message.startswith(f"model version {version}: weights") and "\n" not in message
        assert ("size" in message) if how == "truncated" else ("sha256" in message or "checksum" in message)
        assert info.value.exit_code == 4
    with pytest.raises(RegistryError, match=f"^model version {re.escape(version)}: weights"):
        predict_and_publish(trained["data"], registry.store.uri, "champion", tmp_path / "sub.csv", trained["cache"])
    assert not (tmp_path / "sub.csv").exists() and registry.store.list("submissions/") == []


@pytest.mark.parametrize(("change", "named"), [
    ({"normalization": None}, "normalization must be {mean: 3 numbers, std: 3 positive numbers}"),
    ({"normalization": {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.0, 0.2]}}, "normalization must be"),
    ({"thresholds": [0.5, 0.5, 0.5]}, "thresholds must be 10 numbers in [0, 1], one per class, got 3 values"),
    ({"thresholds": [2.0] * 10}, "thresholds must be 10 numbers in [0, 1]"),
])
def test_a_version_without_what_prediction_reads_is_refused_in_one_line(registry, trained, tmp_path, capsys,
                                                                        change, named):
    # model.json's schema requires only the fields every record has; prediction also reads these.
    from protein.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        local = registry.download(trained["model_id"], Path(tmp))
        spec = json.loads((local / "model.json").read_text())
        fields = {k: spec[k] for k in ("arch", "image_size", "class_names", "thresholds", "normalization")}
        version = registry.register(local / "model.safetensors",
                                    {k: v for k, v in {**fields, **change}.items() if v is not None}, version="odd")
    capsys.readouterr()
    code = main(["predict", "--data", str(trained["data"]), "--store", registry.store.uri, "--model", version,
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "sub.csv")])
    err = capsys.readouterr().err
    assert code == 8, err
    assert err.count("\n") == 1 and f"models/{version}/model.json: {named}" in err, err
    assert not (tmp_path / "sub.csv").exists() and registry.store.list("submissions/") == []


def test_missing_weights_are_refused_before_promotion(registry, trained):
    version = trained["model_id"]
    registry.store.delete(f"models/{version}/model.safetensors")
    with pytest.raises(RegistryError, match=f"model version {version}: weights object missing"):
        registry.promote(version)
    assert registry.champion().champion is None


def test_weights_altered_after_download_are_refused_at_load(registry, trained, tmp_path):
    local = registry.download(trained["model_id"], tmp_path / "dl")
    Predictor.from_checkpoint(local)  # intact: loads
    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, still a loadable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"model version {trained['model_id']}: weights at .* refused \\(sha256"):
        Predictor.from_checkpoint(local)


@pytest.mark.integration
def test_reregistering_a_version_id_never_replaces_its_bytes(any_registry, trained, tmp_path):
    version = trained["model_id"]
    key = f"models/{version}/model.safetensors"
    before = any_registry.store.get_bytes(key)
    other = tmp_path / "other.safetensors"
    other.write_bytes(before[:-1] + bytes([before[-1] ^ 1]))
    with pytest.raises(RegistryError, match="already has different weights"):
        any_registry.register(other, {"arch": "resnet18", "image_size": 32}, version=version)
    assert any_registry.store.get_bytes(key) == before
    any_registry.download(version, tmp_path / "dl")  # still intact


@pytest.mark.parametrize("bad", ["v1\n", "v1\n\n", " v1", "v1/x", "../v1", "v" * 129])
def test_version_and_run_ids_are_matched_in_full(bad):
    with pytest.raises(RegistryError, match="invalid model version"):
        check_version_id(bad)
    with pytest.raises(RegistryError, match="invalid run id"):
        run_index_key(bad)


# --- idempotent history ---------------------------------------------------------------------------------


def test_events_carry_an_id_and_an_actor(registry, trained):
    registry.promote(trained["model_id"], expected_champion=None)
    [event] = registry.champion().history
    assert len(event["event_id"]) == 32 and event["actor"] == default_actor() and "@" in event["actor"]
    spec = registry.spec(trained["model_id"])
    flow_registry = Registry(registry.store, actor="prefect-flow-run:1234")
    second = add_version(flow_registry, trained["model_id"], "by-a-flow")
    assert flow_registry.spec(second)["event"]["actor"] == "prefect-flow-run:1234"
    assert spec["weights_size"] > 0


def test_a_retried_promotion_that_already_landed_succeeds(registry, trained):
    first = trained["model_id"]
    second = add_version(registry, first, "second")
    registry.promote(first, expected_champion=None)
    landed = registry.promote(second, expected_champion=first, event_id="task-run-1")
    # The retry still expects the old champion: without the event id this would be a conflict.
    again = registry.promote(second, expected_champion=first, event_id="task-run-1")
    assert again.champion == second and again.history == landed.history and len(again.history) == 2
    with pytest.raises(PromotionConflict, match="expected " + first):
        registry.promote(second, expected_champion=first, event_id="task-run-2")


def test_rollbacks_walk_back_through_the_promotion_history(registry, trained, capsys):
    a = trained["model_id"]
    b, c = add_version(registry, a, "b-version"), add_version(registry, a, "c-version")
    for version, expected in ((a, None), (b, a), (c, b)):
        registry.promote(version, expected_champion=expected)
    assert registry.rollback().champion == b
    assert registry.rollback().champion == a  # not back to c: no flip-flopping
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    assert [(e["action"], e["model_id"]) for e in registry.history()] == [
        ("promote", a), ("promote", b), ("promote", c), ("rollback", b), ("rollback", a)]

    from protein.cli import main

    assert main(["models", "history", "--json", "--store", registry.store.uri]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [e["action"] for e in events] == ["promote"] * 3 + ["rollback"] * 2
    assert len({e["event_id"] for e in events}) == 5
    assert main(["models", "history", "--registrations", "--store", registry.store.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    # three registrations (the import keeps its original's), three promotions, two rollbacks
    assert len(lines) == 8 and sum(" register " in line for line in lines) == 3


@pytest.mark.integration
def test_racing_promotions_against_an_existing_champion_s3(trained, s3_bucket):
    registry = Registry(open_store(s3_bucket))
    registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    a = trained["model_id"]
    challengers = [add_version(registry, a, f"challenger-{i}") for i in range(4)]
    registry.promote(a, expected_champion=None)
    barrier = threading.Barrier(len(challengers))
    outcomes: dict[str, str] = {}

    def attempt(version: str) -> None:
        barrier.wait()
        try:
            registry.promote(version, expected_champion=a)  # each judged against A: If-Match decides
            outcomes[version] = "won"
        except PromotionConflict as exc:
            outcomes[version] = str(exc)

    threads = [threading.Thread(target=attempt, args=(v,)) for v in challengers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, o in outcomes.items() if o == "won"]
    assert len(outcomes) == len(challengers), outcomes  # every thread answered, won or PromotionConflict
    assert len(winners) == 1, outcomes
    state = registry.champion()
    assert state.champion == winners[0]
    assert [(e["model_id"], e["previous"]) for e in state.history] == [(a, None), (winners[0], a)]


# --- O(1) lookups ---------------------------------------------------------------------------------------


class CountingStore:
    """Counts the store calls a registry makes (each is one request on S3)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return counted


def test_find_by_run_costs_one_request(registry, trained):
    a = trained["model_id"]
    for i in range(5):
        add_version(registry, a, f"v{i}", run_id=f"run-{i}")
    counting = CountingStore(registry.store)
    lookup = Registry(counting)
    assert lookup.find_by_run("run-3") == "v3"
    assert counting.calls == ["get_bytes"]
    counting.calls.clear()
    assert lookup.find_by_run("never-ran") is None
    assert counting.calls == ["get_bytes"]


def test_reindex_backfills_runs_registered_before_the_index(registry, trained):
    version = add_version(registry, trained["model_id"], "legacy", run_id="old-run")
    registry.store.delete(run_index_key("old-run"))
    assert registry.find_by_run("old-run") is None
    assert registry.reindex_runs() == {"old-run": version}
    assert registry.find_by_run("old-run") == version
    assert registry.reindex_runs() == {}


# --- retention ------------------------------------------------------------------------------------------


def test_gc_never_races_a_registration(registry, trained, tmp_path):
    # Weights uploaded, model.json not yet: a registration in progress, seconds old.
    local = registry.download(trained["model_id"], tmp_path / "dl")
    registry.store.put_file("models/in-flight/model.safetensors", local / "model.safetensors", if_none_match=True)
    plan = registry.plan_gc(older_than_s=3600)
    assert plan.orphans == {}
    registry.apply_gc(plan)
    spec = json.loads((local / "model.json").read_text())
    spec["id"] = "in-flight"
    registry.store.put_bytes("models/in-flight/model.json", json.dumps(spec).encode(), if_none_match=True)
    assert registry.resolve("in-flight") == "in-flight"  # completed intact
    # The same folder left behind for longer than the threshold is collected, object by object.
    registry.store.put_bytes("models/crashed/model.safetensors", b"half")
    assert registry.orphans(older_than_s=0) == ["crashed"] and registry.orphans(older_than_s=3600) == []
    assert registry.delete_orphan("crashed") == 1 and registry.orphans() == []


def test_gc_keep_last_spares_the_champion_and_its_history(registry, trained, capsys):
    from protein.cli import main

    a = trained["model_id"]
    versions = [add_version(registry, a, f"v{i}") for i in range(4)]
    registry.promote(versions[0], expected_champion=None)
    registry.promote(versions[1], expected_champion=versions[0])
    registry.rollback()  # champion v0 again; v1 stays in the history
    age_versions(registry, [a, *versions], hours=2)  # past the one-hour guard
    uri = registry.store.uri
    assert main(["models", "gc", "--keep-last", "1", "--store", uri]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["versions"] == [a, versions[2]] and listed["versions_deleted"] is False
    assert set(registry.versions()) == {a, *versions}  # a dry run for complete versions unless --yes
    assert main(["models", "gc", "--keep-last", "1", "--yes", "--store", uri]) == 0
    assert json.loads(capsys.readouterr().out)["versions_deleted"] is True
    assert set(registry.versions()) == {versions[0], versions[1], versions[3]}
    assert registry.store.list(f"models/{versions[2]}/") == []
    with pytest.raises(RegistryError, match="promotion history"):
        registry.delete_version(versions[1])


def test_gc_deleting_a_version_deletes_the_gate_record_and_reports_on_it(registry, trained, capsys):
    """Nothing else may delete them (the operator's policy is the only one that can): left behind, a deleted
    version's gate record (both evaluations, the rows) and its report stayed in the store for ever."""
    from protein.cli import main

    store, champion = registry.store, trained["model_id"]
    registry.promote(champion, expected_champion=None)
    # "old-b" shares the deleted id's first characters: its records are another version's.
    old, old_b, newest = (add_version(registry, champion, v) for v in ("old", "old-b", "newest"))
    age_versions(registry, [champion, old, old_b, newest], hours=2)
    for version in (champion, old, old_b, newest):
        store.put_bytes(f"gates/{version}.json", b"{}")
        store.put_bytes(f"reports/{version}/training.png", b"png")
    judged = "gates/by-data/c0ffee0123456789/0123456789abcdef.json"  # the orchestrator's, of data and config
    store.put_bytes(judged, b"{}")
    assert main(["models", "gc", "--keep-last", "2", "--yes", "--store", store.uri]) == 0
    assert json.loads(capsys.readouterr().out)["versions"] == [old]
    assert store.list("gates/") == sorted([judged, *(f"gates/{v}.json" for v in (champion, old_b, newest))])
    assert store.list("reports/") == sorted(f"reports/{v}/training.png" for v in (champion, old_b, newest))


def age_versions(registry: Registry, versions: list[str], hours: float) -> None:
    """Dates each version's model.json `hours` back, oldest first in list order (a local store)."""
    for i, version in enumerate(versions):
        when = time.time() - hours * 3600 - (len(versions) - i)
        os.utime(registry.store.root / "models" / version / "model.json", (when, when))


def test_gc_keep_last_above_the_count_keeps_every_version(registry, trained):
    versions = [trained["model_id"], *(add_version(registry, trained["model_id"], f"k{i}") for i in range(3))]
    age_versions(registry, versions, hours=2)
    for keep_last in (4, 5, 40):
        assert registry.plan_gc(keep_last=keep_last).versions == [], keep_last
    assert registry.plan_gc(keep_last=3).versions == [versions[0]]
    assert registry.plan_gc(keep_last=0).versions == versions


def test_gc_keep_last_spares_a_version_younger_than_the_age_guard(registry, trained):
    # A retrain registers its challenger, then gates it: the version is minutes old while it is judged.
    old = [trained["model_id"], *(add_version(registry, trained["model_id"], f"o{i}") for i in range(2))]
    age_versions(registry, old, hours=2)
    challenger = add_version(registry, trained["model_id"], "just-registered")
    assert registry.plan_gc(keep_last=0).versions == old
    assert challenger in registry.plan_gc(keep_last=0, older_than_s=0).versions


def test_gc_runs_deletes_checkpoints_of_registered_and_abandoned_runs(registry, trained, capsys):
    from protein.cli import main

    add_version(registry, trained["model_id"], "done", run_id="run-done")
    for run in ("run-done", "run-busy", "run-abandoned"):
        registry.store.put_bytes(f"runs/{run}/checkpoint.pt", b"ckpt")
    old, done = time.time() - 10 * 86400, time.time() - 2 * 86400  # past the one-day age guard
    for path in (registry.store.root / "runs" / "run-abandoned").iterdir():
        os.utime(path, (old, old))
    for path in (registry.store.root / "runs" / "run-done").iterdir():
        os.utime(path, (done, done))
    assert main(["models", "gc", "--runs", "--store", registry.store.uri]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == ["run-abandoned", "run-done"]
    assert registry.store.list("runs/") == ["runs/run-busy/checkpoint.pt"]
