"""What a retrain's scoring steps found, kept in the store beside the run.

Scoring (the gate's evaluation of challenger and champion, the test-set prediction) runs where
the GPU is: the `score` deployment on the gpu pool. A deployment's return value stays on the host
that ran it, so the step writes its result to runs/<run_id>/ and the retrain run on the CPU host
reads it from there. Each record says which question it answers (run, models, data fingerprint),
and the reader refuses a record that answers another one: a stale record of an earlier attempt,
or one scored on data that changed after validation, never reaches the gate.

The GPU host computes the submission but does not publish it: it writes the CSV under the run
(the trainer role may write runs/ and never submissions/, docs/security.md), and the CPU host
publishes it to submissions/ after checking it is the CSV the record describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from protein.errors import StoreError
from protein.pipeline import evaluate_for_gate, predict_test_set, publish_submission
from protein.registry.records import check_run_id
from protein.storage import Store, open_store

GATE_EVALUATION = "gate-evaluation.json"
SUBMISSION = "submission.json"
SUBMISSION_CSV = "submission.csv"


def result_key(run_id: str, name: str) -> str:
    return f"runs/{check_run_id(run_id)}/{name}"


def score_for_gate(
    data_path: str | os.PathLike[str],
    store_uri: str,
    run_id: str,
    challenger_id: str,
    champion_id: str | None,
    device: str = "auto",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate challenger and champion for the gate and keep the result under the run; returns
    where it is and the scores, small enough for a flow run's result."""
    evaluation = evaluate_for_gate(data_path, store_uri, challenger_id, champion_id, cache_dir, device)
    record = {"run_id": run_id, "challenger": challenger_id, "champion": champion_id,
              "data_fingerprint": evaluation["challenger"]["data_fingerprint"], "evaluation": evaluation}
    store = open_store(store_uri)
    key = result_key(run_id, GATE_EVALUATION)
    store.put_bytes(key, json.dumps(record).encode())
    champion = evaluation["champion"] or {}
    return {"uri": f"{store.uri.rstrip('/')}/{key}", "rows": evaluation["rows"].get("count"),
            "challenger_f1_samples": evaluation["challenger"].get("f1_samples"),
            "champion_f1_samples": champion.get("f1_samples")}


def predict_for_run(
    data_path: str | os.PathLike[str],
    store_uri: str,
    run_id: str,
    model_id: str,
    device: str = "auto",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Compute the test-set submission of `model_id` and keep it under the run, unpublished."""
    prediction = predict_test_set(data_path, store_uri, model_id, cache_dir, device)
    store = open_store(store_uri)
    csv_key = result_key(run_id, SUBMISSION_CSV)
    store.put_bytes(csv_key, prediction.csv_bytes, content_type="text/csv")
    record = {"run_id": run_id, "requested_model": model_id, "model_id": prediction.model_id,
              "data_fingerprint": prediction.data_fingerprint, "key": csv_key,
              "sha256": hashlib.sha256(prediction.csv_bytes).hexdigest(), "rows": prediction.csv_bytes.count(b"\n") - 1,
              "extra": prediction.extra}
    store.put_bytes(result_key(run_id, SUBMISSION), json.dumps(record).encode())  # last: the CSV is complete
    return {k: record[k] for k in ("model_id", "rows", "sha256")} | {"uri": f"{store.uri.rstrip('/')}/{csv_key}"}


def read_gate_evaluation(store_uri: str, run_id: str, challenger_id: str, champion_id: str | None,
                         data_fingerprint: str) -> dict[str, Any]:
    """The gate evaluation `score_for_gate` kept for this run: {"rows", "challenger", "champion"}."""
    store = open_store(store_uri)
    record = _read_record(store, run_id, GATE_EVALUATION)
    _expect(store, run_id, GATE_EVALUATION, record, {"run_id": run_id, "challenger": challenger_id,
                                                     "champion": champion_id, "data_fingerprint": data_fingerprint})
    evaluation = record.get("evaluation")
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("challenger"), dict):
        raise StoreError(f"{_uri(store, run_id, GATE_EVALUATION)}: no challenger evaluation in the record")
    return evaluation


def publish_run_submission(store_uri: str, run_id: str, model_id: str, data_fingerprint: str) -> dict[str, Any]:
    """Publish the submission `predict_for_run` kept for this run to submissions/, as
    predict_and_publish would have; returns the published pointer."""
    store = open_store(store_uri)
    record = _read_record(store, run_id, SUBMISSION)
    _expect(store, run_id, SUBMISSION, record, {"run_id": run_id, "requested_model": model_id,
                                                "model_id": model_id, "data_fingerprint": data_fingerprint,
                                                "key": result_key(run_id, SUBMISSION_CSV)})
    csv_bytes = store.get_bytes(record["key"])
    if hashlib.sha256(csv_bytes).hexdigest() != record.get("sha256"):
        raise StoreError(f"{store.uri.rstrip('/')}/{record['key']}: its SHA-256 is not the one "
                         f"{_uri(store, run_id, SUBMISSION)} records; not published")
    extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
    return publish_submission(store, model_id, csv_bytes, data_fingerprint, extra=extra)


def _uri(store: Store, run_id: str, name: str) -> str:
    return f"{store.uri.rstrip('/')}/{result_key(run_id, name)}"


def _read_record(store: Store, run_id: str, name: str) -> dict[str, Any]:
    raw = store.get_bytes(result_key(run_id, name))  # NotFound (a StoreError) names the URI
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise StoreError(f"{_uri(store, run_id, name)}: not a JSON object")
    return record


def _expect(store: Store, run_id: str, name: str, record: dict[str, Any], expected: dict[str, Any]) -> None:
    for field, value in expected.items():
        if record.get(field) != value:
            raise StoreError(f"{_uri(store, run_id, name)}: {field} is {record.get(field)!r}, expected {value!r}; "
                             "the scoring step answered another question, so its result is not used")
