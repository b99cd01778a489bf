"""Scoring results that cross hosts through the store: what the score deployment writes under
runs/<run_id>/ is read back only when it answers the retrain's own question."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from protein.errors import NotFound, StoreError
from protein.pipeline import evaluate_for_gate, predict_and_publish
from protein.run_results import (
    predict_for_run,
    publish_run_submission,
    read_gate_evaluation,
    result_key,
    score_for_gate,
)
from protein.storage import open_store

RUN = "abcdef12-00000001"


@pytest.fixture
def store_uri(trained: dict, tmp_path: Path) -> str:
    """A private copy of the trained store: these tests write runs/ and submissions/."""
    copy = tmp_path / "store"
    shutil.copytree(trained["store"], copy)
    return str(copy)


def test_gate_evaluation_comes_back_as_the_scoring_host_found_it(trained: dict, store_uri: str) -> None:
    model, fingerprint = trained["model_id"], trained["data_fingerprint"]
    summary = score_for_gate(trained["data"], store_uri, RUN, model, None, device="cpu", cache_dir=trained["cache"])
    assert summary["uri"].endswith(f"/runs/{RUN}/gate-evaluation.json")
    direct = evaluate_for_gate(trained["data"], store_uri, model, None, trained["cache"])
    read = read_gate_evaluation(store_uri, RUN, model, None, fingerprint)
    assert read["rows"] == direct["rows"] and read["champion"] is None
    assert read["challenger"]["f1_samples"] == direct["challenger"]["f1_samples"] == summary["challenger_f1_samples"]
    assert read["challenger"]["per_image"] == direct["challenger"]["per_image"]


@pytest.mark.parametrize(("asked", "field"), [
    ({"run_id": "abcdef12-00000002"}, None),  # another run's record does not exist under this run
    ({"challenger_id": "someone-else"}, "challenger"),
    ({"champion_id": "the-old-champion"}, "champion"),
    ({"data_fingerprint": "0" * 64}, "data_fingerprint"),
])
def test_a_gate_evaluation_that_answers_another_question_is_refused(trained: dict, store_uri: str, asked: dict,
                                                                    field: str | None) -> None:
    score_for_gate(trained["data"], store_uri, RUN, trained["model_id"], None, device="cpu",
                   cache_dir=trained["cache"])
    question = {"run_id": RUN, "challenger_id": trained["model_id"], "champion_id": None,
                "data_fingerprint": trained["data_fingerprint"], **asked}
    if field is None:
        with pytest.raises(NotFound, match="gate-evaluation.json"):
            read_gate_evaluation(store_uri, **question)
        return
    with pytest.raises(StoreError, match=f"{field} is .* expected"):
        read_gate_evaluation(store_uri, **question)


def test_a_gate_evaluation_that_is_not_a_record_is_refused(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    for body in (b"not json", b"[1, 2]", json.dumps({"run_id": RUN, "challenger": trained["model_id"],
                                                   "champion": None,
                                                   "data_fingerprint": trained["data_fingerprint"]}).encode()):
        store.put_bytes(result_key(RUN, "gate-evaluation.json"), body)
        with pytest.raises(StoreError, match="gate-evaluation.json"):
            read_gate_evaluation(store_uri, RUN, trained["model_id"], None, trained["data_fingerprint"])


def test_the_scoring_host_computes_the_submission_and_only_the_orchestrator_publishes_it(trained: dict,
                                                                                           store_uri: str) -> None:
    store = open_store(store_uri)
    model = trained["model_id"]
    computed = predict_for_run(trained["data"], store_uri, RUN, model, device="cpu", cache_dir=trained["cache"])
    assert computed["model_id"] == model and computed["rows"] == 12
    assert store.list("submissions/") == [], "the scoring host publishes nothing"

    published = publish_run_submission(store_uri, RUN, model, trained["data_fingerprint"])
    latest = json.loads(store.get_bytes("submissions/latest.json"))
    assert latest["key"] == published["key"] and published["key"].startswith(f"submissions/{model}/")
    assert store.get_bytes(published["key"]) == store.get_bytes(f"runs/{RUN}/submission.csv")
    direct = predict_and_publish(trained["data"], store_uri, model, cache_dir=trained["cache"])
    assert store.get_bytes(direct["key"]) == store.get_bytes(published["key"])


def test_a_replaced_submission_csv_is_not_published(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    # A whole, valid object (the store's own checksum matches it), just not the CSV the record describes.
    original = store.get_bytes(f"runs/{RUN}/submission.csv")
    store.put_bytes(f"runs/{RUN}/submission.csv", original.replace(b"\n500,", b"\n500,0 1 2 3 ", 1))
    with pytest.raises(StoreError, match="SHA-256 is not the one"):
        publish_run_submission(store_uri, RUN, trained["model_id"], trained["data_fingerprint"])
    assert store.list("submissions/") == []


def test_a_submission_for_another_model_or_data_is_not_published(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    with pytest.raises(StoreError, match="requested_model is"):
        publish_run_submission(store_uri, RUN, "another-version", trained["data_fingerprint"])
    with pytest.raises(StoreError, match="data_fingerprint is"):
        publish_run_submission(store_uri, RUN, trained["model_id"], "f" * 64)
    assert store.list("submissions/") == []
