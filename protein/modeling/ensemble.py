"""K-fold models and ensembles: the out-of-fold probabilities each fold model saves, thresholds
tuned on them, and the mean of several versions' test-time-augmented probabilities."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from protein.config import TrainConfig
from protein.data import CompetitionData
from protein.errors import DataError, RecordError, RegistryError
from protein.evaluation.thresholds import METRICS, CrossFit, cross_fit
from protein.labels import LABELS
from protein.registry import SPEC_FILE, Registry, check_version_id, version_prefix
from protein.storage import Store

# Headers and the zip directory of np.savez's archive, beyond its arrays' own bytes.
NPZ_OVERHEAD_BYTES = 64 * 1024


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


def holdout_probs_bound(train_ids: Sequence[str]) -> int:
    """The most bytes an honest holdout archive of some of ``train_ids`` takes: a probability per class
    (float32, counted as float64) and the id ('<U', 4 bytes a character) per row."""
    longest = max((len(i) for i in train_ids), default=1)
    return len(train_ids) * (len(LABELS) * 8 + 4 * longest) + NPZ_OVERHEAD_BYTES


def load_holdout_probs(store: Store, key: str, max_bytes: int | None = None,
                       where: str | None = None) -> tuple[list[str], np.ndarray]:
    """The ids and (rows, C) probabilities `save_holdout_probs` wrote; RecordError naming ``where``
    (default: the object's URI) for an archive over ``max_bytes`` (stored or unpacked) or not of that shape."""
    where = where or f"{store.uri.rstrip('/')}/{key}"
    raw = store.get_bytes(key, max_bytes=max_bytes)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as packed:
            unpacked = sum(info.file_size for info in packed.infolist())
        if max_bytes is not None and unpacked > max_bytes:
            raise RecordError(f"{where}: unpacks to {unpacked:,} bytes, more than the {max_bytes:,} its rows take")
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            ids = [str(i) for i in archive["image_ids"]]
            probs = np.asarray(archive["probs"], dtype=np.float32)
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is one refusal naming it
        raise RecordError(f"{where}: not an .npz of image_ids and probs ({type(exc).__name__})") from None
    if probs.shape != (len(ids), len(LABELS)) or not np.all(np.isfinite(probs)):
        raise RecordError(f"{where}: probs of shape {probs.shape} for {len(ids)} ids, expected "
                          f"({len(ids)}, {len(LABELS)}) finite numbers")
    return ids, probs


def spec_uri(registry: Registry, version: str) -> str:
    return f"{registry.store.uri.rstrip('/')}/{version_prefix(version)}{SPEC_FILE}"


def fold_holdout(registry: Registry, version: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A fold model's holdout record, checked: integer fold (1..folds), folds and seed, and a probs_key
    that is the key this project derives from the version's run id, so model.json cannot point the
    thresholds at another run's (or any other) object. RecordError naming the version's model.json."""
    where = spec_uri(registry, version)
    holdout = spec.get("holdout") or {}
    for field in ("fold", "folds", "seed"):
        value = holdout.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RecordError(f"{where}: holdout.{field} must be a non-negative integer for a fold model, "
                              f"got {str(value)[:40]}")
    if not 1 <= holdout["fold"] <= holdout["folds"]:
        raise RecordError(f"{where}: holdout.fold {holdout['fold']} is not in 1..{holdout['folds']} (holdout.folds)")
    run_id = spec.get("run_id")
    try:
        expected = holdout_probs_key(run_id)
    except RegistryError:
        raise RecordError(f"{where}: a fold model needs its run_id, got {str(run_id)[:40]}") from None
    if holdout.get("probs_key") != expected:
        raise RecordError(f"{where}: holdout.probs_key is {str(holdout.get('probs_key'))[:80]}, expected {expected} "
                          "(its run's own holdout probabilities)")
    return holdout


def out_of_fold_thresholds(registry: Registry, model_ids: Sequence[str], data: CompetitionData,
                           metric: str = "f1_samples", seed: int = 0,
                           data_fingerprint: str | None = None) -> tuple[CrossFit, dict[str, Any]]:
    """Thresholds tuned on the out-of-fold probabilities of K fold models of one dataset: every
    row is predicted by the one model that did not train on it. Refuses models that are not the
    distinct folds of one K-fold split of one dataset, and, given `data_fingerprint` (a refit's
    data), folds of another dataset: relabelled rows under the same ids would tune the thresholds
    on the old data's probabilities against the new labels."""
    specs = {m: registry.spec(m) for m in model_ids}
    problems = [m for m, s in specs.items() if not is_fold_model(s)]
    if problems:
        raise RegistryError(f"out-of-fold thresholds need K-fold models (trained with --fold i/K) that saved their "
                            f"holdout probabilities; not: {', '.join(problems)}")
    folds = {m: fold_holdout(registry, m, s) for m, s in specs.items()}
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
    bound = holdout_probs_bound(data.train_ids)
    for model_id in model_ids:
        fold_ids, fold_probs = load_holdout_probs(registry.store, folds[model_id]["probs_key"], bound,
                                                  f"model {model_id}: holdout probabilities")
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


# TrainConfig fields a refit may set otherwise than its folds; every other field decides the model
# and so the scale of its probabilities, on which the folds' out-of-fold thresholds were tuned.
# - fold, folds, holdout_fraction, refit, thresholds_from: the split itself (a refit has none);
# - seed: the folds' split seed, which for a refit only seeds its initialisation and order;
# - threshold_metric: the refit tunes the out-of-fold thresholds itself, for its own metric;
# - device, compile, channels_last, accumulate, sync_bn, min_batch_per_rank: where and how the
#   same global batch runs (hardware and layout), not what is learnt;
# - recipe: a recorded name; the fields it set are what is compared.
REFIT_MAY_DIFFER = frozenset({"fold", "folds", "holdout_fraction", "refit", "thresholds_from", "seed",
                              "threshold_metric", "device", "compile", "channels_last", "accumulate", "sync_bn",
                              "min_batch_per_rank", "recipe"})


def check_refit_matches_folds(registry: Registry, config: TrainConfig) -> None:
    """RegistryError unless every fold model of ``config.thresholds_from`` was trained with the refit's
    settings (all but REFIT_MAY_DIFFER): folds trained without TTA, or with another architecture or
    image size, give probabilities of another scale, and the refit would ship their thresholds and
    report their scores as its own. A field an older model.json lacks counts as TrainConfig's default."""
    refit = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for model_id in config.thresholds_from:
        trained = registry.spec(model_id).get("train_config")
        if not isinstance(trained, dict):
            raise RecordError(f"{spec_uri(registry, model_id)}: train_config must be an object, "
                              f"got {str(trained)[:40]}")
        differ = [f"{name}: fold {trained.get(name, defaults[name])!r}, refit {value!r}"
                  for name, value in refit.items()
                  if name not in REFIT_MAY_DIFFER and trained.get(name, defaults[name]) != value]
        if differ:
            raise RegistryError(f"fold model {model_id} was trained otherwise than this refit ({'; '.join(differ)}): "
                                "its out-of-fold thresholds and scores would not be the refit's; refit with the "
                                "folds' settings, or train folds with these")


def ensemble_id(model_ids: Sequence[str]) -> str:
    """A stable name for a set of versions (order does not matter), usable as a store key part."""
    digest = hashlib.sha256(",".join(sorted(model_ids)).encode()).hexdigest()[:12]
    return check_version_id(f"ensemble-{digest}")


def is_fold_model(spec: dict[str, Any]) -> bool:
    holdout = spec.get("holdout") or {}
    return holdout.get("fold") is not None and bool(holdout.get("probs_key"))


def ensemble_thresholds(registry: Registry, model_ids: Sequence[str], data: CompetitionData,
                        data_fingerprint: str, metric: str = "f1_samples") -> tuple[np.ndarray, dict[str, Any]]:
    """Thresholds for the mean of several versions' probabilities: tuned on out-of-fold
    probabilities when the versions are the distinct folds of one K-fold split (same fold count and
    seed, one fold each) of the data predicted (``data_fingerprint``), otherwise the mean of the
    members' own thresholds (said so in the returned info). Folds of other data fall back to that
    mean: their out-of-fold probabilities are of the old data's rows, and this data's labels under
    the same ids would tune them wrong.
    Each member's model.json must have passed `protein.modeling.predict.check_inference_fields`
    (its thresholds are read here)."""
    specs = [registry.spec(m) for m in model_ids]
    reason = "not all are fold models with saved holdout probabilities"
    if all(is_fold_model(s) for s in specs):
        holdouts = [fold_holdout(registry, m, s) for m, s in zip(model_ids, specs, strict=True)]
        plans = sorted({(h["folds"], h["seed"]) for h in holdouts})
        numbers = sorted(h["fold"] for h in holdouts)
        trained_on = {s.get("data_fingerprint") for s in specs}
        if len(plans) != 1 or len(set(numbers)) != len(numbers) or len(trained_on) != 1:
            # The same fold of two architectures or seeds, or folds of two pushes: their holdouts
            # overlap or miss rows, so there are no out-of-fold probabilities to tune on.
            reason = (f"not the distinct folds of one K-fold split of one dataset: folds/seed {plans}, "
                      f"folds {numbers}, trained on {len(trained_on)} dataset(s)")
        elif trained_on != {data_fingerprint}:
            # The fingerprint covers the test images and the template too: data whose train split is
            # the folds' falls back as well. Safe (never tuned against relabelled rows), and said so.
            reason = (f"the folds were trained on data {trained_on.pop()}, not the data predicted "
                      f"({data_fingerprint}), whose labels may differ under the same ids; the fingerprint "
                      "covers the test images and template too")
        else:
            tuned, info = out_of_fold_thresholds(registry, model_ids, data, metric, plans[0][1], data_fingerprint)
            return tuned.thresholds, {**info, "held_out": {k: tuned.held_out[k] for k in METRICS}}
    thresholds = np.mean([np.asarray(s["thresholds"], dtype=np.float64) for s in specs], axis=0)
    return thresholds.astype(np.float32), {"source": f"mean of the members' thresholds ({reason})",
                                           "models": list(model_ids)}
