"""submissions/latest.json follows the champion: a retrain publishes its champion's submission
there only while that version is still the champion (protein.pipeline.prediction)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protein.pipeline import prediction
from protein.registry import Registry
from protein.registry.records import ChampionState
from protein.storage import Store, open_store

CSV = b"Image,Label\n1,0\n"


def register(registry: Registry, version: str, tmp_path: Path) -> str:
    weights = tmp_path / f"{version}.safetensors"
    weights.write_bytes(b"weights of " + version.encode())
    return registry.register(weights, {"arch": "resnet18", "image_size": 32}, version=version)


def latest(store: Store) -> dict:
    return json.loads(store.get_bytes(prediction.LATEST_SUBMISSION))


def test_a_retrain_points_latest_at_its_champion_only_while_it_still_is(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two retrains overlap: the one that read the champion before the other promoted its own
    published last and pointed submissions/latest.json back at the old champion."""
    store = open_store(str(tmp_path / "store"))
    registry = Registry(store)
    model, newer = register(registry, "v-old", tmp_path), register(registry, "v-newer", tmp_path)
    registry.promote(model, reason="test")
    first = prediction.publish_submission(store, model, CSV, "a" * 64, as_champion=True)
    assert first["latest"] is True and latest(store)["key"] == first["key"]

    # Not the champion: its submission is kept under its own key, latest.json stays on the champion's.
    stale = prediction.publish_submission(store, "v-not-the-champion", CSV, "a" * 64, as_champion=True)
    assert stale["latest"] is False and store.get_bytes(stale["key"]) == CSV
    assert latest(store)["key"] == first["key"]

    # Right after this run reads the champion (still its model), another run promotes a newer one and
    # publishes it. latest.json's etag was read before the champion, so the write is refused, this run
    # reads both again and leaves latest.json on the newer champion's submission. Had it read the
    # etag after the champion, it would hold the rival's etag and overwrite the newer champion's pointer.
    real_champion, raced = Registry.champion, []

    def champion_then_a_rival(self: Registry) -> ChampionState:
        read = real_champion(self)
        if not raced:
            raced.append(read.champion)
            Registry(store).promote(newer, expected_champion=model, reason="the rival's gate")
            prediction.publish_submission(store, newer, CSV, "b" * 64, as_champion=True)
        return read

    monkeypatch.setattr(Registry, "champion", champion_then_a_rival)
    late = prediction.publish_submission(store, model, CSV, "a" * 64, as_champion=True)
    assert raced == [model] and late["latest"] is False
    assert latest(store)["model_id"] == newer and latest(store)["data_fingerprint"] == "b" * 64
