"""Scoring results that cross hosts through the store: what the score deployment writes under
runs/<run_id>/ is read back only when it answers the retrain's own question, and used only as the
CPU host derives it again from the per-row probabilities and spot-checks them (protein/evidence.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from protein.data import load_competition
from protein.errors import EvidenceRefused, NotFound, StoreError
from protein.evidence import GATE_PROBS, TEST_PROBS, decode_probs, encode_probs
from protein.labels import LABELS
from protein.pipeline import evaluate_for_gate, predict_and_publish
from protein.pipeline.evaluation import evaluation_of_probs, row_index
from protein.pipeline.prediction import submission_csv
from protein.registry import Registry
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
    read = read_gate_evaluation(trained["data"], store_uri, RUN, model, None, fingerprint, cache_dir=trained["cache"])
    assert read["rows"] == direct["rows"] and read["champion"] is None
    assert read["spot_check"]["challenger"]["rows"] == min(64, direct["rows"]["n"])
    assert read["challenger"]["f1_samples"] == direct["challenger"]["f1_samples"] == summary["challenger_f1_samples"]
    assert read["challenger"]["per_image"] == direct["challenger"]["per_image"]


def test_the_gates_metric_tunes_the_thresholds_on_both_hosts(trained: dict, store_uri: str) -> None:
    model, fingerprint = trained["model_id"], trained["data_fingerprint"]
    score_for_gate(trained["data"], store_uri, RUN, model, None, device="cpu", cache_dir=trained["cache"],
                   metric="f1_macro")
    read = read_gate_evaluation(trained["data"], store_uri, RUN, model, None, fingerprint, cache_dir=trained["cache"],
                                metric="f1_macro")
    assert read["challenger"]["scored_with"].startswith("thresholds tuned for f1_macro"), read["challenger"]
    direct = evaluate_for_gate(trained["data"], store_uri, model, None, trained["cache"], metric="f1_macro")
    assert read["challenger"]["f1_macro"] == direct["challenger"]["f1_macro"]
    # A record scored for another metric answers another question.
    with pytest.raises(StoreError, match="metric is 'f1_macro', expected 'f1_samples'"):
        read_gate_evaluation(trained["data"], store_uri, RUN, model, None, fingerprint, cache_dir=trained["cache"])


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
            read_gate_evaluation(trained["data"], store_uri, **question, cache_dir=trained["cache"])
        return
    with pytest.raises(EvidenceRefused, match=f"{field} is .* expected"):
        read_gate_evaluation(trained["data"], store_uri, **question, cache_dir=trained["cache"])


def test_a_gate_evaluation_that_is_not_a_record_is_refused(trained: dict, store_uri: str) -> None:
    """Refused (EvidenceRefused: not retried, the run's one-line failure), each for its own reason."""
    store = open_store(store_uri)
    answers_the_question = {"run_id": RUN, "challenger": trained["model_id"], "champion": None,
                            "data_fingerprint": trained["data_fingerprint"], "metric": "f1_samples"}
    for body, why in ((b"not json", "not a JSON object"), (b"[1, 2]", "not a JSON object"),
                      (json.dumps(answers_the_question).encode(), "no challenger evaluation in the record"),
                      (json.dumps({**answers_the_question, "evaluation": {"challenger": []}}).encode(),
                       "no challenger evaluation in the record")):
        store.put_bytes(result_key(RUN, "gate-evaluation.json"), body)
        with pytest.raises(EvidenceRefused, match=f"gate-evaluation.json: {why}"):
            read_gate_evaluation(trained["data"], store_uri, RUN, trained["model_id"], None,
                                 trained["data_fingerprint"], cache_dir=trained["cache"])


def test_a_submission_csv_that_differs_only_in_line_ends_is_refused_naming_a_line(trained: dict,
                                                                                 store_uri: str) -> None:
    """CRLF line ends (or a trailing blank line) left no line that differs: StopIteration, a traceback."""
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    for forged in (lambda csv: csv.replace(b"\n", b"\r\n"), lambda csv: csv + b"\n"):
        csv = forged(store.get_bytes(f"runs/{RUN}/submission.csv").replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n")
        store.put_bytes(f"runs/{RUN}/submission.csv", csv)
        record = json.loads(store.get_bytes(result_key(RUN, "submission.json")))
        record["sha256"] = __import__("hashlib").sha256(csv).hexdigest()
        store.put_bytes(result_key(RUN, "submission.json"), json.dumps(record).encode())
        with pytest.raises(EvidenceRefused, match=r"submission\.csv: line \d+ is not what the CPU host derives"):
            publish_run_submission(trained["data"], store_uri, RUN, trained["model_id"], trained["data_fingerprint"],
                                   cache_dir=trained["cache"])
    assert store.list("submissions/") == []


def test_the_scoring_host_computes_the_submission_and_only_the_orchestrator_publishes_it(trained: dict,
                                                                                           store_uri: str) -> None:
    store = open_store(store_uri)
    model = trained["model_id"]
    computed = predict_for_run(trained["data"], store_uri, RUN, model, device="cpu", cache_dir=trained["cache"])
    assert computed["model_id"] == model and computed["rows"] == 12
    assert store.list("submissions/") == [], "the scoring host publishes nothing"

    # The retrain publishes its champion: latest.json moves only while the model still is one.
    kept = publish_run_submission(trained["data"], store_uri, RUN, model, trained["data_fingerprint"],
                                  cache_dir=trained["cache"])
    assert kept["latest"] is False and not store.exists("submissions/latest.json")
    Registry(store).promote(model, reason="test")
    published = publish_run_submission(trained["data"], store_uri, RUN, model, trained["data_fingerprint"],
                                       cache_dir=trained["cache"])
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
    with pytest.raises(EvidenceRefused, match="SHA-256 is not the one"):
        publish_run_submission(trained["data"], store_uri, RUN, trained["model_id"], trained["data_fingerprint"],
                               cache_dir=trained["cache"])
    assert store.list("submissions/") == []


def test_a_submission_for_another_model_or_data_is_not_published(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    with pytest.raises(EvidenceRefused, match="requested_model is"):
        publish_run_submission(trained["data"], store_uri, RUN, "another-version", trained["data_fingerprint"])
    with pytest.raises(EvidenceRefused, match="data_fingerprint is"):
        publish_run_submission(trained["data"], store_uri, RUN, trained["model_id"], "f" * 64)
    assert store.list("submissions/") == []


def test_extra_fields_in_a_run_submission_record_are_refused(trained: dict, store_uri: str) -> None:
    # The trainer role writes runs/<id>/submission.json; its "extra" went into latest.json after the
    # fields the CPU host checked, so it could point every reader at another model's or bucket's CSV.
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    record = json.loads(store.get_bytes(result_key(RUN, "submission.json")))
    record["extra"] = {"model_id": "some-other-model", "uri": "s3://elsewhere/forged.csv"}
    store.put_bytes(result_key(RUN, "submission.json"), json.dumps(record).encode())
    with pytest.raises(EvidenceRefused, match=r"submission\.json: extra is .*expected none"):
        publish_run_submission(trained["data"], store_uri, RUN, trained["model_id"], trained["data_fingerprint"],
                               cache_dir=trained["cache"])
    assert store.list("submissions/") == []


def test_extra_fields_never_replace_the_published_pointers_own(trained: dict, store_uri: str) -> None:
    from protein.pipeline.prediction import publish_submission

    store = open_store(store_uri)
    pointer = publish_submission(store, trained["model_id"], b"Image,Label\n1,0\n", "a" * 64,
                                 extra={"model_id": "x", "key": "elsewhere", "members": ["m1", "m2"]})
    latest = json.loads(store.get_bytes("submissions/latest.json"))
    assert latest["model_id"] == trained["model_id"] and latest["key"] == pointer["key"] != "elsewhere"
    assert latest["key"].startswith(f"submissions/{trained['model_id']}/") and latest["members"] == ["m1", "m2"]


def test_a_local_gate_and_submission_refuse_data_changed_since_validation(trained: dict, store_uri: str) -> None:
    """Without a score deployment the retrain scores here, on data named directly (a folder, an s3://
    prefix) that can change during the hours of training: its new rows never passed validation."""
    from protein.errors import FingerprintMismatch

    model, validated = trained["model_id"], trained["data_fingerprint"]
    assert evaluate_for_gate(trained["data"], store_uri, model, None, trained["cache"],
                             expected_fingerprint=validated)["rows"]["n"] > 0
    changed = f"differs from the expected {'0' * 16} \\(the data changed since it was validated\\); nothing"
    with pytest.raises(FingerprintMismatch, match=f"{changed} gated"):
        evaluate_for_gate(trained["data"], store_uri, model, None, trained["cache"], expected_fingerprint="0" * 16)
    with pytest.raises(FingerprintMismatch, match=f"{changed} predicted"):
        predict_and_publish(trained["data"], store_uri, model, cache_dir=trained["cache"],
                            expected_fingerprint="0" * 16)
    assert open_store(store_uri).list("submissions/") == []


# --- forged results: written with the scoring host's rights, refused by what the CPU host derives -----------


def gate_question(trained: dict) -> dict:
    return {"data_path": trained["data"], "run_id": RUN, "challenger_id": trained["model_id"], "champion_id": None,
            "data_fingerprint": trained["data_fingerprint"], "cache_dir": trained["cache"]}


def test_a_forged_verdict_is_refused(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    score_for_gate(trained["data"], store_uri, RUN, trained["model_id"], None, device="cpu",
                   cache_dir=trained["cache"])
    record = json.loads(store.get_bytes(result_key(RUN, "gate-evaluation.json")))
    record["evaluation"]["challenger"]["f1_samples"] = 0.99  # the verdict a forger wants the gate to see
    store.put_bytes(result_key(RUN, "gate-evaluation.json"), json.dumps(record).encode())
    with pytest.raises(EvidenceRefused, match=r"evaluation\.challenger\.f1_samples is not what the CPU host derives"):
        read_gate_evaluation(store_uri=store_uri, **gate_question(trained))


def forge_gate(trained: dict, store_uri: str) -> None:
    """Rewrite the gate's probabilities (every row perfect) and a record that agrees with them."""
    store = open_store(store_uri)
    record = json.loads(store.get_bytes(result_key(RUN, "gate-evaluation.json")))
    ids = record["evaluation"]["rows"]["ids"]
    decode_probs(store.get_bytes(result_key(RUN, GATE_PROBS)), "x", {"challenger": ids})  # the layout is as written
    data = load_competition(trained["data"], require_test=False)
    targets = data.targets[row_index(data, ids)]
    probs = targets.astype("float32")
    store.put_bytes(result_key(RUN, GATE_PROBS), encode_probs({"challenger": (ids, probs)}))
    thresholds = record["evaluation"]["challenger"]["thresholds"]
    forged = evaluation_of_probs(trained["model_id"], trained["data_fingerprint"], probs, targets, thresholds)
    record["evaluation"]["challenger"] = json.loads(json.dumps({**forged, "rows": record["evaluation"]["rows"]}))
    store.put_bytes(result_key(RUN, "gate-evaluation.json"), json.dumps(record).encode())


def test_probabilities_larger_than_their_rows_take_are_refused_unread(trained: dict, store_uri: str) -> None:
    """Read under the bound of an honest archive of the rows asked for: the CPU host's memory is not
    the trainer role's to fill."""
    from protein.evidence import probs_bound

    store = open_store(store_uri)
    score_for_gate(trained["data"], store_uri, RUN, trained["model_id"], None, device="cpu",
                   cache_dir=trained["cache"])
    store.put_bytes(result_key(RUN, GATE_PROBS), b"\0" * (probs_bound({"challenger": ["x" * 64] * 1000}) + 1))
    with pytest.raises(EvidenceRefused, match=r"gate-probs\.npz: [\d,]+ bytes is larger than the [\d,]+-byte cap"):
        read_gate_evaluation(trained["data"], store_uri, RUN, trained["model_id"], None, trained["data_fingerprint"],
                             cache_dir=trained["cache"])


def test_forged_probabilities_that_agree_with_the_verdict_fail_the_spot_check(trained: dict, store_uri: str) -> None:
    score_for_gate(trained["data"], store_uri, RUN, trained["model_id"], None, device="cpu",
                   cache_dir=trained["cache"])
    forge_gate(trained, store_uri)
    with pytest.raises(EvidenceRefused, match=r"challenger's probabilities for image \w+ differ from what the CPU host "
                                              r"computes with the registered weights by 0\.\d+ \(tolerance 0\.05\)"):
        read_gate_evaluation(store_uri=store_uri, **gate_question(trained))


def test_a_champion_made_to_look_worse_fails_its_own_spot_check(trained: dict, store_uri: str) -> None:
    """The trainer rewrites the champion's probabilities (every label wrong) and the record to agree
    with them: only the champion's spot-check stands between a forger and a won gate."""
    from protein.pipeline.evaluation import assemble_gate_evaluation, plan_gate
    from tests.model.test_registry import add_version

    store = open_store(store_uri)
    registry = Registry(store)
    challenger, fingerprint = trained["model_id"], trained["data_fingerprint"]
    spec = registry.spec(challenger)
    champion = add_version(registry, challenger, "the-champion", **{
        k: spec[k] for k in ("data_fingerprint", "holdout", "training_rows", "train_config")})
    score_for_gate(trained["data"], store_uri, RUN, challenger, champion, device="cpu", cache_dir=trained["cache"])
    record = json.loads(store.get_bytes(result_key(RUN, "gate-evaluation.json")))
    ids = record["evaluation"]["rows"]["ids"]
    honest = decode_probs(store.get_bytes(result_key(RUN, GATE_PROBS)), "x", {"challenger": ids, "champion": ids})
    data = load_competition(trained["data"], require_test=False)
    targets = data.targets[row_index(data, ids)]
    worse = (1.0 - targets).astype("float32")
    store.put_bytes(result_key(RUN, GATE_PROBS), encode_probs({"challenger": (ids, honest["challenger"]),
                                                               "champion": (ids, worse)}))
    plan = plan_gate(data, fingerprint, spec, registry.spec(champion))

    def evaluation(model: str, probs: np.ndarray) -> dict:
        return evaluation_of_probs(model, fingerprint, probs, targets, np.asarray(registry.spec(model)["thresholds"]))

    record["evaluation"] = json.loads(json.dumps(assemble_gate_evaluation(
        plan, evaluation(challenger, honest["challenger"]), evaluation(champion, worse), champion)))
    store.put_bytes(result_key(RUN, "gate-evaluation.json"), json.dumps(record).encode())
    question = {**gate_question(trained), "champion_id": champion}
    with pytest.raises(EvidenceRefused, match=r"champion's probabilities for image \w+ differ from what the CPU host"):
        read_gate_evaluation(store_uri=store_uri, **question)


def test_each_read_draws_its_own_spot_check_seed(trained: dict, store_uri: str) -> None:
    score_for_gate(trained["data"], store_uri, RUN, trained["model_id"], None, device="cpu",
                   cache_dir=trained["cache"])
    seeds = {read_gate_evaluation(store_uri=store_uri, **gate_question(trained))["spot_check"]["challenger"]["seed"]
             for _ in range(2)}
    assert len(seeds) == 2, "the seed must be drawn on the CPU host at each check, not fixed"


def test_a_forged_submission_with_a_matching_record_is_not_published(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    # The forger holds the trainer's keys, so it rewrites the record's SHA-256 too (the old check passes).
    forged = store.get_bytes(f"runs/{RUN}/submission.csv").replace(b"\n500,", b"\n500,0 1 2 3 ", 1)
    store.put_bytes(f"runs/{RUN}/submission.csv", forged)
    record = json.loads(store.get_bytes(f"runs/{RUN}/submission.json"))
    store.put_bytes(f"runs/{RUN}/submission.json", json.dumps({**record, "sha256": sha256(forged)}).encode())
    with pytest.raises(EvidenceRefused, match=r"submission\.csv: line \d+ is not what the CPU host derives"):
        publish_run_submission(trained["data"], store_uri, RUN, trained["model_id"], trained["data_fingerprint"],
                               cache_dir=trained["cache"])
    assert store.list("submissions/") == []


def test_forged_test_probabilities_that_agree_with_the_csv_fail_the_spot_check(trained: dict, store_uri: str) -> None:
    store = open_store(store_uri)
    predict_for_run(trained["data"], store_uri, RUN, trained["model_id"], device="cpu", cache_dir=trained["cache"])
    test_ids = load_competition(trained["data"]).test_ids
    probs = np.full((len(test_ids), len(LABELS)), 0.99, dtype="float32")  # every label on every image
    store.put_bytes(result_key(RUN, TEST_PROBS), encode_probs({"model": (test_ids, probs)}))
    spec = Registry(store).spec(trained["model_id"])
    forged = submission_csv(test_ids, probs, np.asarray(spec["thresholds"], dtype="float32"))
    store.put_bytes(f"runs/{RUN}/submission.csv", forged)
    record = json.loads(store.get_bytes(f"runs/{RUN}/submission.json"))
    store.put_bytes(f"runs/{RUN}/submission.json", json.dumps({**record, "sha256": sha256(forged)}).encode())
    with pytest.raises(EvidenceRefused, match=r"test set's probabilities for image \w+ differ"):
        publish_run_submission(trained["data"], store_uri, RUN, trained["model_id"], trained["data_fingerprint"],
                               cache_dir=trained["cache"])
    assert store.list("submissions/") == []


def sha256(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()
