"""The library's use cases, each one call: train and register, evaluate, predict.

The CLI and the Prefect tasks both call these, so a local run and an orchestrated run do
exactly the same work. Inputs are paths, URIs and configs; outputs are small JSON-able dicts.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protein import distributed
from protein.atomic import write_bytes_atomic
from protein.bootstrap import to_bitmasks
from protein.cache import CacheKey, ImageCache
from protein.config import TrainConfig, to_dict
from protein.data import CompetitionData, fingerprint, load_competition
from protein.ensemble import ensemble_id, ensemble_thresholds, out_of_fold_thresholds, save_holdout_probs
from protein.errors import FingerprintMismatch, TrainingFailed
from protein.gate import GateRows, ids_digest, select_rows
from protein.labels import LABELS
from protein.links import object_uri
from protein.metrics import binarize, evaluate_predictions
from protein.model import IMAGENET, imagenet_weights
from protein.predict import Predictor, label_strings
from protein.presets import IMAGE_MEAN, IMAGE_STD
from protein.registry import Registry, check_version_id
from protein.split import iterative_stratified_folds, iterative_stratified_split
from protein.storage import Store, open_store
from protein.thresholds import CrossFit
from protein.train import EpochCallback, check_batch_split, fit, select_device

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = Path("work")


def default_store_uri() -> str:
    return os.environ.get("PROTEIN_STORE", str(DEFAULT_WORK_DIR / "store"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROTEIN_CACHE_DIR", str(DEFAULT_WORK_DIR / "cache")))


def new_run_id(data_fingerprint: str) -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{data_fingerprint[:8]}"


def holdout_split(data: CompetitionData, holdout_fraction: float, seed: int, fold: int | None = None,
                  folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The holdout is a pure function of (labels, fraction, seed) or, with a fold, of (labels,
    folds, seed, fold): a challenger and the champion evaluated with the same parameters see
    exactly the same images. fold is 1-based: fold k of K holds out the k-th part."""
    if fold is None:
        return iterative_stratified_split(data.targets, holdout_fraction, seed)
    fold_of = iterative_stratified_folds(data.targets, folds, seed)
    return np.flatnonzero(fold_of != fold - 1).astype(np.int64), np.flatnonzero(fold_of == fold - 1).astype(np.int64)


def training_split(data: CompetitionData, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, holdout_idx) of a training run: a refit trains on every row."""
    if config.refit:
        return np.arange(len(data.train_ids), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return holdout_split(data, config.holdout_fraction, config.seed, config.fold, config.folds)


def load_split_images(
    data: CompetitionData,
    split: str,
    image_size: int,
    data_fingerprint: str,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    shared: Store | None = None,
) -> np.ndarray:
    """Decoded images of a split; the caller passes the fingerprint it already computed, which
    keys the cache, instead of stat-ing every image again."""
    key = CacheKey(data_fingerprint, split, image_size)
    return ImageCache(cache_dir or default_cache_dir()).build(data, split, image_size, workers, progress, key=key,
                                                              shared=shared)


@dataclass(frozen=True)
class TrainingInputs:
    """What every training entry point starts from: a checked store, the data, its fingerprint and the run id."""

    store: Store
    data: CompetitionData
    data_fingerprint: str
    run_id: str


def open_training_inputs(
    data_path: str | os.PathLike[str],
    store_uri: str,
    run_id: str | None,
    cache_dir: Path | None,
    expected_fingerprint: str | None,
) -> TrainingInputs:
    """Open and check the store, load the data and refuse it if it changed since validation
    (`FingerprintMismatch`); a run id not given is derived from the data's fingerprint."""
    store = open_store(store_uri)
    store.check()
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    check_fingerprint(data.source.description, data_fingerprint, expected_fingerprint)
    run_id = run_id or new_run_id(data_fingerprint)
    check_version_id(run_id)
    return TrainingInputs(store, data, data_fingerprint, run_id)


def train_and_register(
    data_path: str | os.PathLike[str],
    store_uri: str,
    config: TrainConfig,
    run_id: str | None = None,
    cache_dir: Path | None = None,
    on_epoch: EpochCallback | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_decode: Callable[[int], None] | None = None,
    share_cache: bool = False,
    expected_fingerprint: str | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Train on a dataset and register the result as a new (not yet promoted) model version.

    actor is recorded in the registration event (default user@host; a Prefect task passes its flow run).

    share_cache pulls the decoded-image cache from the store when another worker built it, and
    pushes it there otherwise. Under torchrun each rank calls this: they train together (DDP)
    and rank 0 alone registers; the other ranks return {"model_id": None, "rank": r}.
    expected_fingerprint (the one validation saw) makes training refuse data that changed since:
    `FingerprintMismatch`, before anything is trained or registered."""
    with distributed.process_group(select_device(config.device)):
        return _train_and_register(data_path, store_uri, config, run_id, cache_dir, on_epoch, on_batch, on_decode,
                                   share_cache, expected_fingerprint, actor)


def _train_and_register(
    data_path: str | os.PathLike[str],
    store_uri: str,
    config: TrainConfig,
    run_id: str | None,
    cache_dir: Path | None,
    on_epoch: EpochCallback | None,
    on_batch: Callable[[int], None] | None,
    on_decode: Callable[[int], None] | None,
    share_cache: bool,
    expected_fingerprint: str | None,
    actor: str | None,
) -> dict[str, Any]:
    rank = distributed.current()
    if rank.distributed and run_id is None:
        # A derived id carries the time: ranks would disagree on it, and on the checkpoint to resume.
        raise ValueError("a run on several ranks needs --run-id (the launcher of `protein train --nproc` sets it)")
    inputs = open_training_inputs(data_path, store_uri, run_id, cache_dir, expected_fingerprint)
    store, data, data_fingerprint, run_id = inputs.store, inputs.data, inputs.data_fingerprint, inputs.run_id
    registry = Registry(store, actor=actor)
    finished = registry.find_by_run(run_id)
    if finished is not None:
        # A retry after the version was registered (e.g. the task died while reporting):
        # the run is done, registering it twice would only duplicate the version.
        spec = registry.spec(finished)
        log.info("run %s already registered %s; not training again", run_id, finished)
        return {"model_id": finished, "path": f"{store.uri.rstrip('/')}/models/{finished}", "run_id": run_id,
                "data_fingerprint": data_fingerprint, "metrics": summarize(spec.get("metrics", {})),
                "resumed_from_epoch": spec["train_config"]["epochs"], "device": spec.get("device")}
    oof: tuple[CrossFit, dict[str, Any]] | None = None
    if config.refit:  # fail before training if the fold models cannot supply thresholds
        oof = out_of_fold_thresholds(registry, config.thresholds_from, data, config.threshold_metric, config.seed)
    # One decoder per host: its first rank decodes (or finds the cache `--nproc` built before
    # launching); the others wait and memory-map the finished file.
    if rank.local_rank == 0:
        images = load_split_images(data, "train", config.image_size, data_fingerprint, cache_dir, on_decode,
                                   shared=store if share_cache else None)
    distributed.barrier()
    if rank.local_rank != 0:
        images = load_split_images(data, "train", config.image_size, data_fingerprint, cache_dir)
    train_idx, holdout_idx = training_split(data, config)
    result = fit(config, images, data.targets, train_idx, holdout_idx, store, run_id, on_epoch, on_batch)
    if not rank.is_main:
        return {"model_id": None, "rank": rank.rank, "run_id": run_id}

    thresholds, metrics = result.thresholds, result.metrics
    holdout: dict[str, Any] = {"fraction": config.holdout_fraction, "seed": config.seed, "fold": config.fold,
                               "folds": config.folds, "n_train": int(len(train_idx)),
                               "n_holdout": int(len(holdout_idx))}
    if len(holdout_idx):
        holdout["probs_key"] = save_holdout_probs(store, run_id, data, holdout_idx, result.holdout_probs)
    refit: dict[str, Any] | None = None
    if oof is not None:
        # Trained on every row: no holdout of its own. Its thresholds and its reported scores are
        # the fold models' out-of-fold ones (cross-fitted), recorded as such.
        tuned, info = oof
        thresholds, metrics = tuned.thresholds, tuned.metrics()
        refit = {"trained_on": "all rows", **info}
        holdout = {"fraction": None, "seed": config.seed, "fold": None, "folds": None,
                   "n_train": int(len(train_idx)), "n_holdout": 0}
    spec = {
        "arch": config.arch,
        "image_size": config.image_size,
        "normalization": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "class_names": list(LABELS),
        "thresholds": [float(t) for t in thresholds],
        "tta": config.tta,
        "recipe": config.recipe,
        "weights_init": describe_weights(config),
        "ema": {"decay": config.ema_decay} if config.ema_decay > 0 else None,
        "refit": refit,
        "metrics": metrics,
        "history": result.history,
        "data_fingerprint": data_fingerprint,
        # Lineage: the label profile of the data it was trained on. Promotion makes it the drift
        # reference (protein.validation.write_reference_profile), so the hash here is the one the
        # next validation runs are keyed by.
        "label_profile": training_label_profile(data.train_label_sets),
        # The exact rows, so a later gate scores this model only on rows it never trained on,
        # whatever happens to the data (see docs/gate.md).
        "holdout": {**holdout, "ids": [data.train_ids[i] for i in holdout_idx],
                    "ids_sha256": ids_digest(data.train_ids[i] for i in holdout_idx)},
        "training_rows": {"ids": [data.train_ids[i] for i in train_idx],
                          "sha256": ids_digest(data.train_ids[i] for i in train_idx)},
        "train_config": to_dict(config),
        "parent_champion": registry.champion().champion,
        "run_id": run_id,
        "device": result.device,
        # How the global batch was split (ranks, accumulation): the schedule is per global batch.
        "training": result.extra.get("layout"),
    }
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="protein-weights-") as tmp:
        weights = Path(tmp) / "model.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(weights), metadata={"arch": config.arch, "format": "protein-model/1"})
        model_id = registry.register(weights, spec)
    return {
        "model_id": model_id,
        "path": f"{store.uri.rstrip('/')}/models/{model_id}",
        "run_id": run_id,
        "data_fingerprint": data_fingerprint,
        "metrics": summarize(metrics),
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
    }


def train_on_ranks(
    nproc: int,
    data_path: str | os.PathLike[str],
    store_uri: str,
    config: TrainConfig,
    run_id: str | None = None,
    cache_dir: Path | None = None,
    on_decode: Callable[[int], None] | None = None,
    share_cache: bool = False,
    expected_fingerprint: str | None = None,
) -> dict[str, Any]:
    """train_and_register on nproc ranks of this host under torchrun (one per GPU; gloo on CPU).

    The decoded-image cache is built here, once, before any rank starts; the run id is fixed
    here so every rank (and a rerun after a failure) uses the same checkpoint."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    check_batch_split(config, nproc)  # before anything starts: one clear line, not N tracebacks
    device = select_device(config.device)
    if device.type == "cuda" and nproc > torch_cuda_devices():
        raise ValueError(f"--nproc {nproc}: one process per GPU, but this machine has {torch_cuda_devices()}")
    inputs = open_training_inputs(data_path, store_uri, run_id, cache_dir, expected_fingerprint)
    run_id = inputs.run_id
    load_split_images(inputs.data, "train", config.image_size, inputs.data_fingerprint, cache_dir, on_decode,
                      shared=inputs.store if share_cache else None)
    with tempfile.TemporaryDirectory(prefix="protein-job-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"data": str(data_path), "store": store_uri, "config": to_dict(config),
                                   "run_id": run_id, "cache_dir": str(cache_dir) if cache_dir else None,
                                   "expected_fingerprint": inputs.data_fingerprint}))
        code, result = distributed.launch(nproc, ["train-job", str(job)])
    if result is None:
        raise TrainingFailed(f"training run {run_id} on {nproc} ranks failed (torchrun exit {code}; the failing "
                             f"rank's error is above); rerun with run id {run_id} to resume from its last checkpoint")
    return result


def torch_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def describe_weights(config: TrainConfig) -> dict[str, Any] | None:
    """Where the initial weights came from, for model.json."""
    if not config.weights:
        return None
    if config.weights == IMAGENET:
        weights = imagenet_weights(config.arch)
        return {"source": IMAGENET, "enum": weights.enum_name, "file": weights.path.name, "url": weights.url}
    return {"source": "file", "file": Path(config.weights).name}


def check_fingerprint(where: str, actual: str, expected: str | None) -> None:
    if expected is not None and expected.strip() and actual != expected.strip():
        raise FingerprintMismatch(
            f"{where}: data fingerprint {actual} differs from the expected {expected.strip()} (the data changed "
            "since it was validated); refusing to train on it"
        )


def training_label_profile(label_sets: list[frozenset[int]]) -> dict[str, Any]:
    from protein.validation.drift import profile_hash, profile_labels

    profile = profile_labels(label_sets)
    return {**profile, "hash": profile_hash(profile)}


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("f1_samples", "f1_micro", "f1_macro", "course_f_score") if k in metrics}


def recorded_split(spec: dict[str, Any], data: CompetitionData, data_fingerprint: str
                   ) -> tuple[list[str], list[str]] | None:
    """(training ids, holdout ids) of a model version: as its model.json lists them, or rebuilt
    from its split parameters when it was trained on exactly this data; None when unknowable."""
    holdout = spec.get("holdout", {})
    if "ids" in holdout and "ids" in spec.get("training_rows", {}):
        return list(spec["training_rows"]["ids"]), list(holdout["ids"])
    if spec.get("data_fingerprint") == data_fingerprint and "fraction" in holdout and "seed" in holdout:
        train_idx, holdout_idx = holdout_split(data, holdout["fraction"], holdout["seed"])
        return [data.train_ids[i] for i in train_idx], [data.train_ids[i] for i in holdout_idx]
    return None


def gate_rows(data: CompetitionData, data_fingerprint: str, challenger_spec: dict[str, Any],
              champion_spec: dict[str, Any] | None) -> GateRows:
    """The rows of this dataset neither the challenger nor the champion trained on."""
    challenger = recorded_split(challenger_spec, data, data_fingerprint)
    if challenger is None:  # a model from elsewhere: its own split parameters on this data
        holdout = challenger_spec.get("holdout", {})
        _, holdout_idx = holdout_split(data, holdout.get("fraction") or 0.2, holdout.get("seed", 0),
                                       holdout.get("fold"), holdout.get("folds") or 5)
        challenger_holdout = [data.train_ids[i] for i in holdout_idx]
    else:
        challenger_holdout = challenger[1]
    present = set(data.train_ids)
    challenger_holdout = [i for i in challenger_holdout if i in present]
    if champion_spec is None:
        return select_rows(challenger_holdout)
    champion = recorded_split(champion_spec, data, data_fingerprint)
    return select_rows(challenger_holdout, champion[0] if champion else None, champion[1] if champion else None,
                       has_champion=True)


def _evaluate_rows(registry: Registry, data: CompetitionData, data_fingerprint: str, model_id: str,
                   ids: list[str], cache_dir: Path | None, device: str = "auto") -> dict[str, Any]:
    """Metrics of one version on the given rows, plus its per-image predictions (as class
    bitmasks) for the gate's paired bootstrap."""
    position = {image_id: i for i, image_id in enumerate(data.train_ids)}
    index = np.array([position[i] for i in ids], dtype=np.int64)
    predictor = load_predictor(registry, model_id, cache_dir, device)
    images = load_split_images(data, "train", predictor.image_size, data_fingerprint, cache_dir)
    probs = predictor.predict_probs(np.ascontiguousarray(images[index]))
    targets = data.targets[index].astype(bool)
    metrics = evaluate_predictions(probs, targets, predictor.thresholds)
    thresholds = np.asarray(metrics["thresholds"])
    per_image = {"pred": to_bitmasks(binarize(probs, thresholds, ensure_one=True)),
                 "raw": to_bitmasks(probs > thresholds), "targets": to_bitmasks(targets)}
    return {"model_id": model_id, "data_fingerprint": data_fingerprint, **metrics, "per_image": per_image}


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
    if recorded:
        rows = gate_rows(data, data_fingerprint, spec, None)
    else:
        _, holdout_idx = holdout_split(data, fraction, seed)
        rows = select_rows(data.train_ids[i] for i in holdout_idx)
    result = _evaluate_rows(registry, data, data_fingerprint, model_id, list(rows.ids), cache_dir)
    return {**result, "holdout": {"fraction": fraction, "seed": seed, "n_holdout": len(rows.ids)},
            "rows": rows.to_dict()}


def evaluate_for_gate(
    data_path: str | os.PathLike[str],
    store_uri: str,
    challenger_id: str,
    champion_id: str | None,
    cache_dir: Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Score the challenger and the champion on the same rows, none of which either trained on.

    Returns {"rows", "challenger", "champion"}; both evaluations carry the row set (ids, count,
    sha256, how it was chosen). With no fair row at all the champion is not scored and the
    challenger is scored on its own holdout, so the gate can still say what it saw.
    `device`: 'auto' (CUDA when present), 'cpu' or 'cuda[:n]'."""
    store = open_store(store_uri)
    registry = Registry(store)
    challenger_id = registry.resolve(challenger_id)
    challenger_spec = registry.spec(challenger_id)
    champion_spec = registry.spec(champion_id) if champion_id else None
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    rows = gate_rows(data, data_fingerprint, challenger_spec, champion_spec)
    summary = rows.to_dict()
    if rows.ids:
        challenger = _evaluate_rows(registry, data, data_fingerprint, challenger_id, list(rows.ids), cache_dir,
                                    device)
        champion = (_evaluate_rows(registry, data, data_fingerprint, champion_id, list(rows.ids), cache_dir,
                                   device) if champion_id else None)
    else:
        own = gate_rows(data, data_fingerprint, challenger_spec, None)
        challenger = _evaluate_rows(registry, data, data_fingerprint, challenger_id, list(own.ids), cache_dir,
                                    device)
        challenger["scored_on"] = own.selection
        champion = {"model_id": champion_id, "scored_on": "not scored: no row it did not train on"}
    challenger["rows"] = summary
    if champion is not None:
        champion["rows"] = summary
    return {"rows": summary, "challenger": challenger, "champion": champion}


def load_predictor(registry: Registry, model_id: str, cache_dir: Path | None = None,
                   device: str = "auto") -> Predictor:
    local = registry.download(model_id, (cache_dir or default_cache_dir()) / "models")
    return Predictor.from_checkpoint(local, device)


@dataclass(frozen=True)
class TestSetPrediction:
    """A submission computed but not yet published."""

    model_id: str  # the version, or ensemble-<hash> for several
    csv_bytes: bytes
    data_fingerprint: str
    extra: dict[str, Any]  # an ensemble's members and thresholds


def predict_test_set(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str | Sequence[str] = "champion",
    cache_dir: Path | None = None,
    device: str = "auto",
) -> TestSetPrediction:
    """The test set's submission CSV from one version, or from several as an ensemble: the mean
    of their (test-time-augmented) probabilities."""
    registry = Registry(open_store(store_uri))
    requested = [model_id] if isinstance(model_id, str) else list(model_id)
    if not requested:
        raise ValueError("predict needs at least one model version")
    model_ids = [registry.resolve(m) for m in requested]
    if len(set(model_ids)) != len(model_ids):
        raise ValueError(f"a model version is named twice in {requested}")
    data = load_competition(data_path, require_test=True, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    if len(model_ids) == 1:
        predictor = load_predictor(registry, model_ids[0], cache_dir, device)
        images = load_split_images(data, "test", predictor.image_size, data_fingerprint, cache_dir)
        frame = predictor.submission(data.test_ids, images)
        return TestSetPrediction(model_ids[0], frame.to_csv(index=False, lineterminator="\n").encode(),
                                 data_fingerprint, {})

    thresholds, threshold_info = ensemble_thresholds(registry, model_ids, data)
    total: np.ndarray | None = None
    for member in model_ids:  # one member in memory at a time
        predictor = load_predictor(registry, member, cache_dir, device)
        images = load_split_images(data, "test", predictor.image_size, data_fingerprint, cache_dir)
        probs = predictor.predict_probs(images)
        total = probs if total is None else total + probs
    assert total is not None
    labels = label_strings(total / len(model_ids), thresholds)
    frame = pd.DataFrame({"Image": data.test_ids, "Label": labels})
    return TestSetPrediction(ensemble_id(model_ids), frame.to_csv(index=False, lineterminator="\n").encode(),
                             data_fingerprint, {"members": model_ids, "thresholds": [float(t) for t in thresholds],
                                                "thresholds_from": threshold_info})


def predict_and_publish(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str | Sequence[str] = "champion",
    out: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Predict the test set and write submissions/<model>/<utc>/submission.csv plus
    submissions/latest.json to the store (and `out` locally when given). Several versions make
    an ensemble, published under submissions/ensemble-<hash>/."""
    prediction = predict_test_set(data_path, store_uri, model_id, cache_dir, device)
    return publish_submission(open_store(store_uri), prediction.model_id, prediction.csv_bytes,
                              prediction.data_fingerprint, out, prediction.extra)


def publish_submission(
    store: Store, model_id: str, csv_bytes: bytes, data_fingerprint: str, out: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}"
    key = f"submissions/{check_version_id(model_id)}/{stamp}/submission.csv"
    store.put_bytes(key, csv_bytes, content_type="text/csv")
    pointer = {"model_id": model_id, "key": key, "uri": f"{store.uri.rstrip('/')}/{key}",
               "data_fingerprint": data_fingerprint, "created": stamp, "rows": csv_bytes.count(b"\n") - 1,
               **(extra or {})}
    store.put_bytes("submissions/latest.json", json.dumps(pointer, indent=2).encode())
    if out is not None:
        write_bytes_atomic(Path(out), csv_bytes)
        pointer["local_path"] = str(Path(out).resolve())
    return pointer


def record_gate_decision(store_uri: str, challenger_id: str, champion_id: str | None, decision: dict[str, Any],
                         challenger_eval: dict[str, Any], champion_eval: dict[str, Any] | None) -> str:
    """Keep every gate decision in the store, beside the models it judged."""
    store = open_store(store_uri)
    key = f"gates/{check_version_id(challenger_id)}.json"
    doc = {"challenger": challenger_id, "champion": champion_id, "decision": decision,
           "challenger_eval": challenger_eval, "champion_eval": champion_eval,
           "decided": dt.datetime.now(dt.UTC).isoformat()}
    store.put_bytes(key, json.dumps(doc, indent=2).encode())
    return f"{store.uri.rstrip('/')}/{key}"


def publish_training_plot(store_uri: str, model_id: str, challenger_eval: dict[str, Any],
                          champion_eval: dict[str, Any] | None) -> str:
    """Render the training curves and per-class F1 to reports/<model>/training.png; return its
    durable URI (s3:// or file://; `protein link` makes an openable URL of it)."""
    from protein.report import training_plot_png

    store = open_store(store_uri)
    spec = Registry(store).spec(model_id)
    png = training_plot_png(spec.get("history", []), challenger_eval["per_class"]["f1"],
                            champion_eval["per_class"]["f1"] if champion_eval else None, title=model_id)
    key = f"reports/{check_version_id(model_id)}/training.png"
    store.put_bytes(key, png, content_type="image/png")
    return object_uri(store, key)
