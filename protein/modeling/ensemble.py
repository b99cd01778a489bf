"""K-fold models and ensembles: the out-of-fold probabilities each fold model saves, thresholds
tuned on them, and the mean of several versions' test-time-augmented probabilities."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from protein.data import CompetitionData
from protein.errors import DataError, RegistryError
from protein.evaluation.thresholds import METRICS, CrossFit, cross_fit
from protein.registry import Registry, check_version_id
from protein.storage import Store


def holdout_probs_key(run_id: str) -> str:
    return f"runs/{check_version_id(run_id)}/holdout_probs.npz"


def save_holdout_probs(store: Store, run_id: str, data: CompetitionData, holdout_idx: np.ndarray,
                       probs: np.ndarray) -> str:
    """The holdout's probabilities with their image ids (plain arrays, no pickle): the
    out-of-fold predictions that tune an ensemble's or a refit's thresholds."""
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=np.asarray([data.train_ids[i] for i in holdout_idx], dtype=str),
             probs=probs.astype(np.float32))
    key = holdout_probs_key(run_id)
    store.put_bytes(key, buffer.getvalue())
    return key


def load_holdout_probs(store: Store, key: str) -> tuple[list[str], np.ndarray]:
    with np.load(io.BytesIO(store.get_bytes(key)), allow_pickle=False) as archive:
        return [str(i) for i in archive["image_ids"]], np.asarray(archive["probs"], dtype=np.float32)


def out_of_fold_thresholds(registry: Registry, model_ids: Sequence[str], data: CompetitionData,
                           metric: str = "f1_samples", seed: int = 0,
                           data_fingerprint: str | None = None) -> tuple[CrossFit, dict[str, Any]]:
    """Thresholds tuned on the out-of-fold probabilities of K fold models of one dataset: every
    row is predicted by the one model that did not train on it. Refuses models that are not the
    distinct folds of one K-fold split of one dataset, and, given `data_fingerprint` (a refit's
    data), folds of another dataset: relabelled rows under the same ids would tune the thresholds
    on the old data's probabilities against the new labels."""
    specs = {m: registry.spec(m) for m in model_ids}
    folds = {m: (s.get("holdout") or {}) for m, s in specs.items()}
    problems = [m for m, h in folds.items() if h.get("fold") is None or not h.get("probs_key")]
    if problems:
        raise RegistryError(f"out-of-fold thresholds need K-fold models (trained with --fold i/K) that saved their "
                            f"holdout probabilities; not: {', '.join(problems)}")
    plans = {(h["folds"], h["seed"], specs[m].get("data_fingerprint")) for m, h in folds.items()}
    numbers = sorted(h["fold"] for h in folds.values())
    if len(plans) != 1 or len(set(numbers)) != len(numbers):
        raise RegistryError(f"models {', '.join(model_ids)} are not distinct folds of one K-fold split of one dataset "
                            f"(folds/seed/data: {sorted(map(str, plans))}, folds {numbers})")
    k, _, folds_fingerprint = plans.pop()
    if data_fingerprint is not None and folds_fingerprint != data_fingerprint:
        raise DataError(f"{data.source.description}: data fingerprint {data_fingerprint}, but the fold models "
                        f"{', '.join(model_ids)} were trained on {folds_fingerprint}; refit on the data the folds "
                        "were trained on, or train new folds on this data")
    data_fingerprint = folds_fingerprint
    ids: list[str] = []
    probs: list[np.ndarray] = []
    for model_id in model_ids:
        fold_ids, fold_probs = load_holdout_probs(registry.store, folds[model_id]["probs_key"])
        ids += fold_ids
        probs.append(fold_probs)
    row_of = {image_id: i for i, image_id in enumerate(data.train_ids)}
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise DataError(f"{data.source.description}: out-of-fold image ids not in train.csv (e.g. {missing[0]}); "
                        "tune with the dataset the fold models were trained on")
    targets = data.targets[[row_of[i] for i in ids]]
    tuned = cross_fit(np.concatenate(probs), targets, metric, seed)
    info = {"source": "out-of-fold", "models": list(model_ids), "folds": k, "fold_numbers": numbers,
            "complete": numbers == list(range(1, k + 1)), "n_rows": len(ids), "data_fingerprint": data_fingerprint}
    return tuned, info


def ensemble_id(model_ids: Sequence[str]) -> str:
    """A stable name for a set of versions (order does not matter), usable as a store key part."""
    digest = hashlib.sha256(",".join(sorted(model_ids)).encode()).hexdigest()[:12]
    return check_version_id(f"ensemble-{digest}")


def is_fold_model(spec: dict[str, Any]) -> bool:
    holdout = spec.get("holdout") or {}
    return holdout.get("fold") is not None and bool(holdout.get("probs_key"))


def ensemble_thresholds(registry: Registry, model_ids: Sequence[str], data: CompetitionData,
                        metric: str = "f1_samples") -> tuple[np.ndarray, dict[str, Any]]:
    """Thresholds for the mean of several versions' probabilities: tuned on out-of-fold
    probabilities when the versions are the folds of one K-fold split, otherwise the mean of
    the members' own thresholds (said so in the returned info)."""
    specs = [registry.spec(m) for m in model_ids]
    if all(is_fold_model(s) for s in specs):
        seed = int(specs[0]["holdout"]["seed"])
        tuned, info = out_of_fold_thresholds(registry, model_ids, data, metric, seed)
        return tuned.thresholds, {**info, "held_out": {k: tuned.held_out[k] for k in METRICS}}
    thresholds = np.mean([np.asarray(s["thresholds"], dtype=np.float64) for s in specs], axis=0)
    return thresholds.astype(np.float32), {"source": "mean of the members' thresholds (not all are fold models "
                                                     "with saved holdout probabilities)", "models": list(model_ids)}
