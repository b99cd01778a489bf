import json
import threading

import pandas as pd
import pytest

from protein.data import fingerprint, load_competition
from protein.errors import IntegrityError, PromotionConflict, RegistryError
from protein.pipeline import evaluate_version, load_split_images, predict_and_publish
from protein.predict import Predictor
from protein.registry import CHAMPION_KEY, Registry
from protein.storage import open_store


@pytest.fixture
def registry(trained, tmp_path):
    """A fresh store holding a copy of the trained version, so tests never share a champion."""
    target = Registry(open_store(str(tmp_path / "store")))
    target.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    return target


def test_model_version_is_self_describing(trained):
    spec = Registry(open_store(trained["store"])).spec(trained["model_id"])
    for field in ("arch", "image_size", "normalization", "class_names", "thresholds", "metrics", "data_fingerprint",
                  "train_config", "code_version", "created", "parent_champion", "weights_sha256"):
        assert field in spec, field
    assert spec["arch"] == "resnet18" and spec["image_size"] == 32 and len(spec["thresholds"]) == 10
    assert spec["train_config"]["epochs"] == 1
    assert spec["data_fingerprint"] == trained["data_fingerprint"]


def test_versions_are_immutable(registry, trained, tmp_path):
    with pytest.raises(RegistryError, match="already exists"):
        registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])


def test_promote_rollback_and_history(registry, trained):
    first = trained["model_id"]
    assert registry.champion().champion is None
    registry.promote(first, expected_champion=None, reason="first")
    # A second version: the same weights under another id.
    local = registry.download(first)
    spec = json.loads((local / "model.json").read_text())
    second = registry.register(local / "model.safetensors", {k: spec[k] for k in ("arch", "image_size",
                               "normalization", "class_names", "thresholds", "metrics")}, version="second-version")
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
    return outcomes


def test_racing_promotions_exactly_one_wins_local(registry, trained):
    outcomes = race_promotions(registry, trained["model_id"])
    assert outcomes.count("won") == 1
    assert all("champion" in o for o in outcomes if o != "won")
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
    with pytest.raises(RegistryError) as info:
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
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        registry.download(trained["model_id"], tmp_path / "dl")


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
