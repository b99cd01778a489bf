"""A version's model.json carries the label profile of its training data; promoting it makes that
profile the drift reference, with or without a validation report in the store."""

from __future__ import annotations

import shutil
from pathlib import Path

from protein.registry import Registry
from protein.storage import open_store
from protein.validation.drift import profile_hash
from protein.validation.reference import load_reference, report_key, write_reference_profile


def test_promotion_makes_the_recorded_training_profile_the_reference(trained: dict, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(trained["store"], root)  # the session's store stays as other tests expect it
    store = open_store(str(root))
    spec = Registry(store).spec(trained["model_id"])
    profile = spec["label_profile"]
    assert profile["n"] == 40 and len(profile["class_share"]) == 10
    assert profile["hash"] == profile_hash(profile)
    assert not store.exists(report_key(spec["data_fingerprint"])), "this store never validated the data"

    written = write_reference_profile(store, trained["model_id"])
    assert written is not None
    reference = load_reference(store)
    assert reference["model_id"] == trained["model_id"]
    assert reference["class_share"] == profile["class_share"]
    assert reference["labels_per_image_share"] == profile["labels_per_image_share"]
