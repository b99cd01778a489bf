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

Whoever holds the trainer's keys can write runs/, so the CPU host trusts neither the verdict nor
the CSV for where they lie: each step also keeps its per-row probabilities, from which the CPU
host derives the evaluation and the CSV itself, and spot-checks a random sample of rows on its
own CPU (protein/evidence.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from protein.data import CompetitionData, fingerprint, load_competition
from protein.errors import EvidenceRefused, RecordError
from protein.evidence import (
    GATE_PROBS,
    TEST_PROBS,
    SpotCheck,
    decode_probs,
    draw_seed,
    encode_probs,
    probs_bound,
    spot_check,
)
from protein.pipeline import evaluate_for_gate, load_predictor, predict_test_set, publish_submission
from protein.pipeline.evaluation import assemble_gate_evaluation, evaluation_of_probs, plan_gate, row_index
from protein.pipeline.prediction import submission_csv
from protein.registry import Registry
from protein.registry.records import check_run_id
from protein.storage import Store, open_store
from protein.storage.records import record_cap

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
    metric: str = "f1_samples",
) -> dict[str, Any]:
    """Evaluate challenger and champion for the gate (thresholds tuned for its ``metric``) and keep
    the result under the run; returns where it is and the scores, small enough for a flow run's result."""
    scored: dict[str, tuple[list[str], Any]] = {}
    evaluation = evaluate_for_gate(data_path, store_uri, challenger_id, champion_id, cache_dir, device, scored,
                                   metric=metric)
    store = open_store(store_uri)
    store.put_bytes(result_key(run_id, GATE_PROBS), encode_probs(scored))  # before the record that points to it
    record = {"run_id": run_id, "challenger": challenger_id, "champion": champion_id, "metric": metric,
              "data_fingerprint": evaluation["challenger"]["data_fingerprint"], "evaluation": evaluation}
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
    if prediction.probs is None:  # an ensemble: the retrain publishes one version's submission
        raise ValueError(f"a run's submission is one model version's, not {model_id!r}")
    test_ids = load_competition(data_path, require_test=True, cache_dir=cache_dir).test_ids
    store.put_bytes(result_key(run_id, TEST_PROBS), encode_probs({"model": (test_ids, prediction.probs)}))
    csv_key = result_key(run_id, SUBMISSION_CSV)
    store.put_bytes(csv_key, prediction.csv_bytes, content_type="text/csv")
    record = {"run_id": run_id, "requested_model": model_id, "model_id": prediction.model_id,
              "data_fingerprint": prediction.data_fingerprint, "key": csv_key,
              "sha256": hashlib.sha256(prediction.csv_bytes).hexdigest(), "rows": prediction.csv_bytes.count(b"\n") - 1,
              "extra": prediction.extra}
    store.put_bytes(result_key(run_id, SUBMISSION), json.dumps(record).encode())  # last: the CSV is complete
    return {k: record[k] for k in ("model_id", "rows", "sha256")} | {"uri": f"{store.uri.rstrip('/')}/{csv_key}"}


def read_gate_evaluation(data_path: str | os.PathLike[str], store_uri: str, run_id: str, challenger_id: str,
                         champion_id: str | None, data_fingerprint: str, check: SpotCheck = SpotCheck(),
                         cache_dir: Path | None = None, metric: str = "f1_samples") -> dict[str, Any]:
    """The gate evaluation of this run as the CPU host derives it from the scoring host's
    probabilities, after checking them: {"rows", "challenger", "champion", "spot_check"}.
    EvidenceRefused when the record or the probabilities are not what this host computes."""
    store = open_store(store_uri)
    record = _read_record(store, run_id, GATE_EVALUATION)
    _expect(store, run_id, GATE_EVALUATION, record, {"run_id": run_id, "challenger": challenger_id,
                                                     "champion": champion_id, "data_fingerprint": data_fingerprint,
                                                     "metric": metric})
    if not isinstance(record.get("evaluation"), dict) or not isinstance(record["evaluation"].get("challenger"), dict):
        raise EvidenceRefused(f"{_uri(store, run_id, GATE_EVALUATION)}: no challenger evaluation in the record")
    registry = Registry(store)
    data = _load_validated(data_path, data_fingerprint, False, cache_dir)
    plan = plan_gate(data, data_fingerprint, registry.spec(challenger_id),
                     registry.spec(champion_id) if champion_id else None)
    models = {"challenger": challenger_id}
    if champion_id and plan.champion_ids is not None:
        models["champion"] = champion_id
    rows = {name: plan.challenger_ids if name == "challenger" else list(plan.champion_ids or []) for name in models}
    where = _uri(store, run_id, GATE_PROBS)
    probs = decode_probs(_read_capped(store, result_key(run_id, GATE_PROBS), probs_bound(rows)), where, rows)
    seed = draw_seed()  # only now: the evidence is already written and read
    evaluations: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for offset, (name, model_id) in enumerate(models.items()):
        predictor = load_predictor(registry, model_id, cache_dir, "cpu")
        index = row_index(data, rows[name])
        evaluations[name] = evaluation_of_probs(model_id, data_fingerprint, probs[name], data.targets[index],
                                                predictor.thresholds, metric)
        if name == "challenger":  # the derived verdict must be the reported one before anything is scored
            derived = assemble_gate_evaluation(plan, evaluations["challenger"], None, None)["challenger"]
            _same(store, run_id, "evaluation.challenger", json.loads(json.dumps(derived)),
                  record["evaluation"]["challenger"])
        checks[name] = spot_check(predictor, data, "train", rows[name], probs[name], check, seed + offset, where,
                                  name)
    evaluation = assemble_gate_evaluation(plan, evaluations["challenger"], evaluations.get("champion"), champion_id)
    _same(store, run_id, "evaluation", json.loads(json.dumps(evaluation)), record["evaluation"])
    return {**evaluation, "spot_check": checks}


def publish_run_submission(data_path: str | os.PathLike[str], store_uri: str, run_id: str, model_id: str,
                           data_fingerprint: str, check: SpotCheck = SpotCheck(),
                           cache_dir: Path | None = None) -> dict[str, Any]:
    """Publish the submission `predict_for_run` kept for this run to submissions/, as
    predict_and_publish would have, once the CPU host derived the same CSV from the scoring
    host's probabilities and spot-checked them; returns the published pointer."""
    store = open_store(store_uri)
    record = _read_record(store, run_id, SUBMISSION)
    _expect(store, run_id, SUBMISSION, record, {"run_id": run_id, "requested_model": model_id,
                                                "model_id": model_id, "data_fingerprint": data_fingerprint,
                                                "key": result_key(run_id, SUBMISSION_CSV)})
    csv_bytes = _read_capped(store, record["key"], record_cap())
    if hashlib.sha256(csv_bytes).hexdigest() != record.get("sha256"):
        raise EvidenceRefused(f"{store.uri.rstrip('/')}/{record['key']}: its SHA-256 is not the one "
                              f"{_uri(store, run_id, SUBMISSION)} records; not published")
    data = _load_validated(data_path, data_fingerprint, True, cache_dir)
    where = _uri(store, run_id, TEST_PROBS)
    expected = {"model": data.test_ids}
    probs = decode_probs(_read_capped(store, result_key(run_id, TEST_PROBS), probs_bound(expected)), where,
                         expected)["model"]
    predictor = load_predictor(Registry(store), model_id, cache_dir, "cpu")
    derived = submission_csv(data.test_ids, probs, predictor.thresholds)
    if derived != csv_bytes:
        # The first line that differs; past the shorter one's end when they differ only in line ends
        # (CRLF) or a trailing blank line (next() without a default raised StopIteration there).
        ours, theirs = derived.split(b"\n"), csv_bytes.split(b"\n")
        line = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False), 1) if a != b),
                    min(len(ours), len(theirs)) + 1)
        raise EvidenceRefused(f"{store.uri.rstrip('/')}/{record['key']}: line {line} is not what the CPU host derives "
                              f"from {where} with the thresholds of {model_id}; not published")
    spot_check(predictor, data, "test", data.test_ids, probs, check, draw_seed(), where, "test set")
    # One version's submission has no extra fields (an ensemble's members are never a run's): what
    # the scoring host wrote there would reach submissions/latest.json unchecked.
    if record.get("extra"):
        raise EvidenceRefused(f"{_uri(store, run_id, SUBMISSION)}: extra is {record['extra']!r}, expected none for "
                              f"one model version's submission; not published")
    return publish_submission(store, model_id, derived, data_fingerprint, as_champion=True)


def _load_validated(data_path: str | os.PathLike[str], data_fingerprint: str, require_test: bool,
                    cache_dir: Path | None) -> CompetitionData:
    data = load_competition(data_path, require_test=require_test, cache_dir=cache_dir)
    actual = fingerprint(data.source)
    if actual != data_fingerprint:
        raise EvidenceRefused(f"{data.source.description}: data fingerprint {actual} differs from the validated "
                              f"{data_fingerprint}; the scoring host's results cannot be checked against it")
    return data


def _same(store: Store, run_id: str, field: str, derived: Any, reported: Any) -> None:
    """Refuse a reported value that is not the derived one, naming the first field that differs."""
    if derived == reported:
        return
    if isinstance(derived, dict) and isinstance(reported, dict):
        for key in sorted(set(derived) | set(reported)):
            _same(store, run_id, f"{field}.{key}", derived.get(key), reported.get(key))
    raise EvidenceRefused(f"{_uri(store, run_id, GATE_EVALUATION)}: {field} is not what the CPU host derives from "
                          f"{GATE_PROBS}; the scoring host's verdict is refused")


def _uri(store: Store, run_id: str, name: str) -> str:
    return f"{store.uri.rstrip('/')}/{result_key(run_id, name)}"


def _read_capped(store: Store, key: str, max_bytes: int) -> bytes:
    """What the scoring host wrote, read only up to what an honest result takes: over it is a
    refusal (EvidenceRefused, never retried), not the CPU host's memory. NotFound names the URI."""
    try:
        return store.get_bytes(key, max_bytes=max_bytes)
    except RecordError as exc:
        raise EvidenceRefused(str(exc)) from None


def _read_record(store: Store, run_id: str, name: str) -> dict[str, Any]:
    raw = _read_capped(store, result_key(run_id, name), record_cap())
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise EvidenceRefused(f"{_uri(store, run_id, name)}: not a JSON object")
    return record


def _expect(store: Store, run_id: str, name: str, record: dict[str, Any], expected: dict[str, Any]) -> None:
    # Refusals, not transient StoreErrors: a retry reads the same answer to another question, and the
    # retrain fails on EvidenceRefused in one line (a StoreError left it as a traceback).
    for field, value in expected.items():
        if record.get(field) != value:
            raise EvidenceRefused(f"{_uri(store, run_id, name)}: {field} is {record.get(field)!r}, expected "
                                  f"{value!r}; the scoring step answered another question, so its result is not used")
