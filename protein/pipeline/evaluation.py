"""Score model versions on rows neither trained on, for the gate, and keep the gate's records."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protein.config import TrainConfig, to_dict
from protein.data import CompetitionData, fingerprint, load_competition
from protein.errors import EvidenceRefused, NotFound
from protein.evaluation.bootstrap import to_bitmasks
from protein.evaluation.gate import GateRows, select_rows
from protein.evaluation.gated_data import record_gated_data, withdraw_gated_data
from protein.evaluation.thresholds import cross_fitted_rows, predict_labels
from protein.links import object_uri
from protein.pipeline.inputs import check_fingerprint, holdout_split, load_split_images, training_split
from protein.pipeline.prediction import load_predictor
from protein.registry import Registry, gate_record_key, newest_promotion, report_prefix
from protein.storage import open_store
from protein.storage.records import RecordSchema, load_record, record_location


def recorded_split(spec: dict[str, Any], data: CompetitionData, data_fingerprint: str
                   ) -> tuple[list[str], list[str]] | None:
    """(training ids, holdout ids) of a model version: as its model.json lists them, or rebuilt
    from its split parameters when it was trained on exactly this data; None when unknowable."""
    holdout = spec.get("holdout", {})
    if "ids" in holdout and "ids" in spec.get("training_rows", {}):
        return list(spec["training_rows"]["ids"]), list(holdout["ids"])
    if spec.get("data_fingerprint") == data_fingerprint and "fraction" in holdout and "seed" in holdout:
        if holdout["fraction"] is None:  # a refit trained on every row of this data
            return (list(data.train_ids), []) if spec.get("refit") else None
        # A fold model's split is its fold of the stratified folds, not a fraction's split.
        args = (holdout["fraction"], holdout["seed"], holdout.get("fold"), holdout.get("folds") or 5)
        train_idx, holdout_idx = holdout_split(data, *args)
        # A version this old may predate keeping byte-identical images on one side, and the two
        # splits differ where the data holds such copies: count a row as trained on if either
        # split trained on it, and as held out only if both held it out.
        old_train_idx, old_holdout_idx = holdout_split(data, *args, grouped=False)
        train_idx = np.union1d(train_idx, old_train_idx)
        holdout_idx = np.intersect1d(holdout_idx, old_holdout_idx)
        return [data.train_ids[i] for i in train_idx], [data.train_ids[i] for i in holdout_idx]
    return None


def check_declared_split(spec: dict[str, Any], data: CompetitionData, config: TrainConfig, where: str) -> None:
    """Refuse a challenger whose model.json declares other rows than the split ``config`` makes of
    ``data``. The gate scores a challenger on the holdout it declares; a model.json is written by
    whoever trained it (the GPU host), so a declared holdout is taken only when it is the one this
    run asked for: a trainer cannot grade itself on rows it trained on by naming them its holdout."""
    train_idx, holdout_idx = training_split(data, config)
    expected = {"training_rows": [data.train_ids[i] for i in train_idx],
                "holdout": [data.train_ids[i] for i in holdout_idx]}
    for part, ids in expected.items():
        declared = part_doc.get("ids") if isinstance(part_doc := spec.get(part), dict) else None
        if declared != ids:
            count = f"{len(declared)} ids" if isinstance(declared, list) else "no id list"
            raise EvidenceRefused(
                f"{where}: its model.json declares {part} ({count}) other than the split this run asked for "
                f"({len(ids)} ids: holdout_fraction={config.holdout_fraction}, seed={config.seed}, "
                f"fold={config.fold}, refit={config.refit}); the gate does not score a model on rows it chose")


def check_declared_lineage(spec: dict[str, Any], data: CompetitionData, data_fingerprint: str, config: TrainConfig,
                           where: str) -> None:
    """Refuse a challenger whose model.json says it trained on other data, with another config, or
    with another label profile than this run validated and asked for. Once it serves, its data
    fingerprint places it in push order (a forged older or newer one would let older data be
    promoted, or make the newer push's run skip as trained), its fingerprint and config key the
    gate's judgement of that data, and its label profile becomes the drift reference."""
    from protein.evaluation.gated_data import config_digest
    from protein.pipeline.training import training_label_profile

    if spec.get("data_fingerprint") != data_fingerprint:
        raise EvidenceRefused(f"{where}: its model.json says it trained on data {spec.get('data_fingerprint')!r}, but "
                              f"this run validated and asked for {data_fingerprint}; not gated")
    recorded = spec.get("train_config")
    if not isinstance(recorded, dict) or config_digest(recorded) != config_digest(to_dict(config)):
        raise EvidenceRefused(f"{where}: its model.json records another training config than the one this run "
                              f"asked for; not gated")
    profile = json.loads(json.dumps(training_label_profile(data.train_label_sets)))
    if spec.get("label_profile") != profile:
        raise EvidenceRefused(f"{where}: its model.json records another label profile than this run's data has; "
                              f"not gated")


def verify_challenger_split(data_path: str | os.PathLike[str], store_uri: str, challenger_id: str,
                            config: TrainConfig, data_fingerprint: str, cache_dir: Path | None = None) -> None:
    """check_declared_split and check_declared_lineage for a challenger registered elsewhere on the
    dataset at data_path, which this run validated as data_fingerprint."""
    registry = Registry(open_store(store_uri))
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    spec, where = registry.spec(challenger_id), f"challenger {challenger_id}"
    check_declared_lineage(spec, data, data_fingerprint, config, where)
    check_declared_split(spec, data, config, where)


def gate_rows(data: CompetitionData, data_fingerprint: str, challenger_spec: dict[str, Any],
              champion_spec: dict[str, Any] | None) -> GateRows:
    """The rows of this dataset neither the challenger nor the champion trained on."""
    challenger = recorded_split(challenger_spec, data, data_fingerprint)
    if challenger is None:  # a model from elsewhere: its own split parameters on this data
        holdout = challenger_spec.get("holdout", {})
        train_idx, holdout_idx = holdout_split(data, holdout.get("fraction") or 0.2, holdout.get("seed", 0),
                                               holdout.get("fold"), holdout.get("folds") or 5)
        challenger_train = [data.train_ids[i] for i in train_idx]
        challenger_holdout = [data.train_ids[i] for i in holdout_idx]
    else:
        challenger_train, challenger_holdout = challenger
    present = set(data.train_ids)
    challenger_holdout = [i for i in challenger_holdout if i in present]
    # Content digests the fingerprint already holds: a row whose image bytes either model trained
    # on under another id is no more unseen than the row it copies.
    digest_of = data.train_image_digests()
    if champion_spec is None:
        return select_rows(challenger_holdout, challenger_train=challenger_train, digest_of=digest_of)
    champion = recorded_split(champion_spec, data, data_fingerprint)
    return select_rows(challenger_holdout, champion[0] if champion else None, champion[1] if champion else None,
                       has_champion=True, challenger_train=challenger_train, digest_of=digest_of)


def evaluation_of_probs(model_id: str, data_fingerprint: str, probs: np.ndarray, targets: np.ndarray,
                        thresholds: np.ndarray, metric: str = "f1_samples") -> dict[str, Any]:
    """Metrics of one version from its probabilities on some rows, plus its per-image predictions
    (as class bitmasks) for the gate's paired bootstrap. Pure: the CPU host recomputes a GPU
    host's evaluation from the probabilities it reported (protein/evidence.py).

    Scored with thresholds tuned out of sample (`cross_fitted_rows`: each half of the rows with
    thresholds tuned for `metric` on the other half), as training scores its holdout for
    model.json, never with the shipped ones: those were tuned on the model's own holdout, so on
    rows from it a model would be scored in sample, and after a data change these rows are in the
    challenger's holdout but not the champion's (a bias as large as the gate's min_gain). Both
    models get the same halves of the same rows."""
    targets = targets.astype(bool)
    metrics, row_thresholds = cross_fitted_rows(probs, targets, metric)
    per_image = {"pred": to_bitmasks(predict_labels(probs, row_thresholds)),
                 "raw": to_bitmasks(probs > row_thresholds), "targets": to_bitmasks(targets)}
    return {"model_id": model_id, "data_fingerprint": data_fingerprint, **metrics,
            "thresholds": [float(t) for t in thresholds],
            "scored_with": f"thresholds tuned for {metric} on the other half of these rows (cross-fitted), "
                           "not the shipped ones", "per_image": per_image}


def row_index(data: CompetitionData, ids: list[str]) -> np.ndarray:
    position = {image_id: i for i, image_id in enumerate(data.train_ids)}
    return np.array([position[i] for i in ids], dtype=np.int64)


def _evaluate_rows(registry: Registry, data: CompetitionData, data_fingerprint: str, model_id: str,
                   ids: list[str], cache_dir: Path | None, device: str = "auto",
                   probs_out: dict[str, tuple[list[str], np.ndarray]] | None = None, name: str = "",
                   metric: str = "f1_samples") -> dict[str, Any]:
    """Metrics of one version on the given rows; (ids, probabilities) go to probs_out[name] when given."""
    index = row_index(data, ids)
    predictor = load_predictor(registry, model_id, cache_dir, device)
    images = load_split_images(data, "train", predictor.image_size, data_fingerprint, cache_dir)
    probs = predictor.predict_probs(np.ascontiguousarray(images[index]))
    if probs_out is not None:
        probs_out[name] = (ids, probs)
    return evaluation_of_probs(model_id, data_fingerprint, probs, data.targets[index], predictor.thresholds, metric)


def evaluate_version(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str,
    holdout_fraction: float | None = None,
    seed: int | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score a model version on a dataset's holdout: by default the rows it held out when it
    trained (as model.json lists them), else the split given by fraction and seed."""

    store = open_store(store_uri)
    registry = Registry(store)
    model_id = registry.resolve(model_id)
    spec = registry.spec(model_id)
    holdout = spec.get("holdout") or {}
    # Decided before `seed` is rebound below: only an explicit fraction or seed replaces the
    # recorded rows (rebinding first made every call take the explicit path).
    recorded = holdout_fraction is None and seed is None
    fraction = holdout_fraction if holdout_fraction is not None else (holdout.get("fraction") or 0.2)
    seed = seed if seed is not None else holdout.get("seed", 0)
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    unseen = gate_rows(data, data_fingerprint, spec, None)  # the rows the model did not train on
    if recorded:
        rows = unseen
    else:
        # Another split's rows, less those the model trained on: scored on them, the model looked
        # better the more of its training rows the split held, and was still called its holdout.
        _, holdout_idx = holdout_split(data, fraction, seed)
        split = {data.train_ids[i] for i in holdout_idx}
        kept = split & set(unseen.ids)
        if not kept:
            raise ValueError(f"no row of the split (holdout fraction {fraction:g}, seed {seed}) is one {model_id} did "
                             "not train on; leave out --holdout and --seed to score it on its own holdout")
        left_out = len(split) - len(kept)
        rows = GateRows(tuple(sorted(kept)), f"{len(kept)} rows of the split (fraction {fraction:g}, seed {seed}) that "
                                             f"{model_id} did not train on; {left_out} it trained on left out",
                        excluded=left_out)
    result = _evaluate_rows(registry, data, data_fingerprint, model_id, list(rows.ids), cache_dir)
    return {**result, "holdout": {"fraction": fraction, "seed": seed, "n_holdout": len(rows.ids)},
            "rows": rows.to_dict()}


@dataclass(frozen=True)
class GatePlan:
    """Which rows each model is scored on for the gate (a pure function of the data and both
    model.json files, so the CPU host rebuilds it to check a GPU host's scores)."""

    rows: GateRows  # the fair rows: neither model trained on them
    challenger_ids: list[str]
    champion_ids: list[str] | None  # None: no champion, or no fair row to score it on
    challenger_scored_on: str | None  # set when the challenger falls back to its own holdout


def plan_gate(data: CompetitionData, data_fingerprint: str, challenger_spec: dict[str, Any],
              champion_spec: dict[str, Any] | None) -> GatePlan:
    rows = gate_rows(data, data_fingerprint, challenger_spec, champion_spec)
    if rows.ids:
        return GatePlan(rows, list(rows.ids), list(rows.ids) if champion_spec is not None else None, None)
    # With no fair row at all the champion is not scored and the challenger is scored on its
    # own holdout, so the gate can still say what it saw.
    own = gate_rows(data, data_fingerprint, challenger_spec, None)
    return GatePlan(rows, list(own.ids), None, own.selection)


def assemble_gate_evaluation(plan: GatePlan, challenger: dict[str, Any], champion: dict[str, Any] | None,
                             champion_id: str | None) -> dict[str, Any]:
    """{"rows", "challenger", "champion"} as the gate reads it, from each model's evaluation."""
    summary = plan.rows.to_dict()
    if plan.challenger_scored_on is not None:
        challenger["scored_on"] = plan.challenger_scored_on
        champion = {"model_id": champion_id, "scored_on": "not scored: no row it did not train on"}
    challenger["rows"] = summary
    if champion is not None:
        champion["rows"] = summary
    return {"rows": summary, "challenger": challenger, "champion": champion}


def evaluate_for_gate(
    data_path: str | os.PathLike[str],
    store_uri: str,
    challenger_id: str,
    champion_id: str | None,
    cache_dir: Path | None = None,
    device: str = "auto",
    probs_out: dict[str, tuple[list[str], np.ndarray]] | None = None,
    metric: str = "f1_samples",
    expected_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Score the challenger and the champion on the same rows, none of which either trained on,
    each with thresholds tuned for the gate's `metric` on other rows than the ones it is scored on.

    Returns {"rows", "challenger", "champion"}; both evaluations carry the row set (ids, count,
    sha256, how it was chosen). With no fair row at all the champion is not scored and the
    challenger is scored on its own holdout, so the gate can still say what it saw.
    `device`: 'auto' (CUDA when present), 'cpu' or 'cuda[:n]'. `probs_out` receives each scored
    model's row ids and probabilities ("challenger", "champion"). `expected_fingerprint`: the data
    a retrain validated (FingerprintMismatch when the data changed since)."""
    store = open_store(store_uri)
    registry = Registry(store)
    challenger_id = registry.resolve(challenger_id)
    challenger_spec = registry.spec(challenger_id)
    champion_spec = registry.spec(champion_id) if champion_id else None
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    check_fingerprint(str(data_path), data_fingerprint, expected_fingerprint, "nothing gated")
    plan = plan_gate(data, data_fingerprint, challenger_spec, champion_spec)
    challenger = _evaluate_rows(registry, data, data_fingerprint, challenger_id, plan.challenger_ids, cache_dir,
                                device, probs_out, "challenger", metric)
    champion = None
    if champion_id and plan.champion_ids is not None:
        champion = _evaluate_rows(registry, data, data_fingerprint, champion_id, plan.champion_ids, cache_dir, device,
                                  probs_out, "champion", metric)
    return assemble_gate_evaluation(plan, challenger, champion, champion_id)


GATE_RECORD = RecordSchema("gate record", required={"challenger": str, "decision": dict},
                           optional={"champion": (str, type(None)), "decided": str, "promotion": dict})


def record_gate_decision(store_uri: str, challenger_id: str, champion_id: str | None, decision: dict[str, Any],
                         challenger_eval: dict[str, Any], champion_eval: dict[str, Any] | None) -> str:
    """Keep every gate decision in the store, beside the models it judged."""
    store = open_store(store_uri)
    key = gate_record_key(challenger_id)
    doc = {"challenger": challenger_id, "champion": champion_id, "decision": decision,
           "challenger_eval": challenger_eval, "champion_eval": champion_eval,
           "decided": dt.datetime.now(dt.UTC).isoformat()}
    store.put_bytes(key, json.dumps(doc, indent=2).encode())
    # After the record it points at: a scheduled run skips this data and config from now on.
    record_gated_data(store, challenger_id, Registry(store).spec(challenger_id), decision)
    return record_location(store, key)


def earlier_gate_decision(store_uri: str, challenger_id: str) -> dict[str, Any] | None:
    """The decision gates/<challenger>.json records (with record_uri, the champion it was judged
    against, what became of its promotion, whether the challenger ever served and the registry's
    event id of its newest promotion), or None when the gate never judged it: for a rerun whose
    earlier attempt gated its challenger."""
    store = open_store(store_uri)
    key = gate_record_key(challenger_id)
    try:
        record = load_record(store, key, GATE_RECORD)
    except NotFound:
        return None
    promotion = newest_promotion(Registry(store).champion().history, challenger_id)
    return {**record["decision"], "record_uri": record_location(store, key), "promotion": record.get("promotion"),
            "judged_against": record.get("champion"), "served": promotion is not None,
            "promotion_event_id": promotion.get("event_id") if promotion else None}


def withdraw_gate_pass(store_uri: str, challenger_id: str, why: str) -> None:
    """A passed gate whose promotion did not land (another promotion moved the champion first):
    gates/<challenger>.json says so, and the judgement of its data and config under gates/by-data/
    is withdrawn while it still names this challenger. Left in place, it said "promoted", and every
    scheduled run skipped that data as judged, though its challenger never served."""
    store = open_store(store_uri)
    key = gate_record_key(challenger_id)
    record = load_record(store, key, GATE_RECORD)
    record["promotion"] = {"landed": False, "why": why, "at": dt.datetime.now(dt.UTC).isoformat()}
    store.put_bytes(key, json.dumps(record, indent=2).encode())
    withdraw_gated_data(store, challenger_id, Registry(store).spec(challenger_id), why)


def publish_training_plot(store_uri: str, model_id: str, challenger_eval: dict[str, Any],
                          champion_eval: dict[str, Any] | None) -> str:
    """Render the training curves and per-class F1 to reports/<model>/training.png; return its
    durable URI (s3:// or file://; `protein link` makes an openable URL of it)."""
    from protein.evaluation.report import training_plot_png

    store = open_store(store_uri)
    spec = Registry(store).spec(model_id)
    png = training_plot_png(spec.get("history", []), challenger_eval["per_class"]["f1"],
                            champion_eval["per_class"]["f1"] if champion_eval else None, title=model_id)
    key = f"{report_prefix(model_id)}training.png"
    store.put_bytes(key, png, content_type="image/png")
    return object_uri(store, key)
