"""The gate's record of the data and training config it judged (protein.evaluation.gated_data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from protein.config import TrainConfig, to_dict
from protein.data.fingerprint import FINGERPRINT_CHARS
from protein.evaluation.gated_data import (
    config_digest,
    covers,
    gated_before,
    gated_key,
    record_gated_data,
    withdraw_gated_data,
)
from protein.storage import LocalStore

FINGERPRINT = "ab" * (FINGERPRINT_CHARS // 2)


def spec(config: TrainConfig, fingerprint: str = FINGERPRINT) -> dict[str, object]:
    return {"data_fingerprint": fingerprint, "train_config": to_dict(config)}


def served(store: LocalStore, *versions: str) -> None:
    """registry/champion.json with a promotion of each version, in order."""
    import json

    history = [{"action": "promote", "model_id": v, "previous": None} for v in versions]
    store.put_bytes("registry/champion.json", json.dumps({"champion": versions[-1], "history": history}).encode())


def test_a_judged_challenger_is_found_by_its_data_and_config(tmp_path: Path):
    store = LocalStore(tmp_path)
    config = TrainConfig(epochs=2)
    assert gated_before(str(tmp_path), FINGERPRINT, config) is None
    key = record_gated_data(store, "m-1", spec(config), {"promote": False, "reasons": ["score 0.3 < 0.5"]})
    assert key == f"gates/by-data/{FINGERPRINT}/{config_digest(to_dict(config))}.json"
    judged = gated_before(str(tmp_path), FINGERPRINT, config)
    assert judged is not None
    assert (judged["challenger"], judged["promoted"], judged["reasons"]) == ("m-1", False, ["score 0.3 < 0.5"])
    # The newest judgement wins.
    record_gated_data(store, "m-2", spec(config), {"promote": True, "reasons": []})
    served(store, "m-2")
    assert gated_before(str(tmp_path), FINGERPRINT, config)["challenger"] == "m-2"  # type: ignore[index]


def test_other_data_or_another_training_config_is_not_judged(tmp_path: Path):
    store = LocalStore(tmp_path)
    record_gated_data(store, "m-1", spec(TrainConfig()), {"promote": False})
    assert gated_before(str(tmp_path), "cd" * (FINGERPRINT_CHARS // 2), TrainConfig()) is None
    assert gated_before(str(tmp_path), FINGERPRINT, TrainConfig(epochs=9)) is None
    # Where it trained is not what it trained: a device of its own is the same training.
    assert gated_before(str(tmp_path), FINGERPRINT, dataclasses.replace(TrainConfig(), device="cpu")) is not None


def test_a_version_that_does_not_say_what_it_trained_on_is_not_recorded(tmp_path: Path):
    store = LocalStore(tmp_path)
    assert record_gated_data(store, "m-1", {"data_fingerprint": FINGERPRINT}, {"promote": False}) is None
    assert record_gated_data(store, "m-1", {"train_config": {}}, {"promote": False}) is None
    assert store.list("gates/") == []


@pytest.mark.parametrize("bad", ["", FINGERPRINT.upper(), FINGERPRINT[:-1], "../" + FINGERPRINT[3:], FINGERPRINT + "/x",
                                 "ab" * 32])
def test_a_fingerprint_is_checked_before_it_names_a_key(bad: str):
    with pytest.raises(ValueError, match=f"{FINGERPRINT_CHARS} lowercase hex digits"):
        gated_key(bad, "0" * 16)


def test_a_later_push_of_the_same_data_is_new_input(tmp_path: Path):
    store = LocalStore(tmp_path)
    judged_order = {"channel": "latest", "challenger_sequence": 3, "champion_sequence": None}
    record_gated_data(store, "m-1", spec(TrainConfig()), {"promote": True, "data_order": judged_order})
    served(store, "m-1")
    judged = gated_before(str(tmp_path), FINGERPRINT, TrainConfig())
    assert judged is not None and (judged["channel"], judged["sequence"]) == ("latest", 3)
    assert covers(judged, {"channel": "latest", "sequence": 3})  # the judged push itself (its queued run)
    assert not covers(judged, {"channel": "latest", "sequence": 5})  # pushed again since: train it
    assert covers(judged, {"channel": "other", "sequence": 9})  # another channel's order says nothing here
    assert covers(judged, {"channel": None, "sequence": None})  # a dataset named directly
    assert covers({"challenger": "m-0"}, {"channel": "latest", "sequence": 5})  # a record from before channels
    # Judged by a manual run before this data was ever pushed there: its first push is new input.
    record_gated_data(store, "m-2", spec(TrainConfig()), {"promote": False, "data_order": {
        "channel": "latest", "challenger_sequence": None, "champion_sequence": 2}})
    never_pushed = gated_before(str(tmp_path), FINGERPRINT, TrainConfig())
    assert never_pushed is not None and never_pushed["sequence"] is None
    assert not covers(never_pushed, {"channel": "latest", "sequence": 4})
    assert covers(never_pushed, {"channel": None, "sequence": None})  # the same dataset named directly again


def test_a_withdrawn_pass_is_no_judgement_and_never_takes_a_newer_one_with_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    store, config = LocalStore(tmp_path), TrainConfig()
    served(store, "m-1")  # so that only the withdrawal can make the pass no judgement below
    record_gated_data(store, "m-1", spec(config), {"promote": True})
    assert not withdraw_gated_data(store, "m-0", spec(config), "lost"), "another challenger's judgement stands"
    assert withdraw_gated_data(store, "m-1", spec(config), "its promotion lost to another")
    assert gated_before(str(tmp_path), FINGERPRINT, config) is None

    # Another run judges the same data and config between this one's read and its write: theirs stands.
    record_gated_data(store, "m-1", spec(config), {"promote": True})
    real_get = store.get_bytes

    def read_then_a_rival_judges(key: str, **kwargs: object) -> bytes:
        read = real_get(key, **kwargs)
        record_gated_data(store, "m-2", spec(config), {"promote": False, "reasons": ["refused"]})
        return read

    monkeypatch.setattr(store, "get_bytes", read_then_a_rival_judges)
    assert not withdraw_gated_data(store, "m-1", spec(config), "its promotion lost to another")
    monkeypatch.undo()
    assert gated_before(str(tmp_path), FINGERPRINT, config)["challenger"] == "m-2"  # type: ignore[index]


def test_a_pass_whose_promotion_never_landed_is_no_judgement(tmp_path: Path):
    """The gate records its pass before the promotion: a run that died between the two left the data
    "promoted" for every scheduled run to skip, by a challenger that never served."""
    store, config = LocalStore(tmp_path), TrainConfig()
    record_gated_data(store, "m-1", spec(config), {"promote": True})
    assert gated_before(str(tmp_path), FINGERPRINT, config) is None
    served(store, "m-0")
    assert gated_before(str(tmp_path), FINGERPRINT, config) is None
    served(store, "m-0", "m-1", "m-0")  # served, then rolled back from: the judgement stands
    assert gated_before(str(tmp_path), FINGERPRINT, config)["challenger"] == "m-1"  # type: ignore[index]
