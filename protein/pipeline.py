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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from protein.atomic import write_bytes_atomic
from protein.cache import CacheKey, ImageCache
from protein.config import TrainConfig, to_dict
from protein.data import CompetitionData, fingerprint, load_competition
from protein.errors import FingerprintMismatch
from protein.labels import LABELS
from protein.metrics import evaluate_predictions
from protein.predict import Predictor
from protein.presets import IMAGE_MEAN, IMAGE_STD
from protein.registry import Registry, check_version_id
from protein.split import iterative_stratified_split
from protein.storage import Store, open_store
from protein.train import EpochCallback, fit

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = Path("work")


def default_store_uri() -> str:
    return os.environ.get("PROTEIN_STORE", str(DEFAULT_WORK_DIR / "store"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROTEIN_CACHE_DIR", str(DEFAULT_WORK_DIR / "cache")))


def new_run_id(data_fingerprint: str) -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{data_fingerprint[:8]}"


def holdout_split(data: CompetitionData, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The holdout is a pure function of (labels, fraction, seed): a challenger and the
    champion evaluated with the same parameters see exactly the same images."""
    return iterative_stratified_split(data.targets, holdout_fraction, seed)


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
) -> dict[str, Any]:
    """Train on a dataset and register the result as a new (not yet promoted) model version.

    share_cache pulls the decoded-image cache from the store when another worker built it, and
    pushes it there otherwise. expected_fingerprint (the one validation saw) makes training refuse
    data that changed since: `FingerprintMismatch`, before anything is trained or registered."""
    store = open_store(store_uri)
    store.check()
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    check_fingerprint(data.source.description, data_fingerprint, expected_fingerprint)
    run_id = run_id or new_run_id(data_fingerprint)
    check_version_id(run_id)
    registry = Registry(store)
    finished = registry.find_by_run(run_id)
    if finished is not None:
        # A retry after the version was registered (e.g. the task died while reporting):
        # the run is done, registering it twice would only duplicate the version.
        spec = registry.spec(finished)
        log.info("run %s already registered %s; not training again", run_id, finished)
        return {"model_id": finished, "path": f"{store.uri.rstrip('/')}/models/{finished}", "run_id": run_id,
                "data_fingerprint": data_fingerprint, "metrics": summarize(spec.get("metrics", {})),
                "resumed_from_epoch": spec["train_config"]["epochs"], "device": spec.get("device")}
    images = load_split_images(data, "train", config.image_size, data_fingerprint, cache_dir, on_decode,
                               shared=store if share_cache else None)
    train_idx, holdout_idx = holdout_split(data, config.holdout_fraction, config.seed)
    result = fit(config, images, data.targets, train_idx, holdout_idx, store, run_id, on_epoch, on_batch)

    spec = {
        "arch": config.arch,
        "image_size": config.image_size,
        "normalization": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "class_names": list(LABELS),
        "thresholds": [float(t) for t in result.thresholds],
        "metrics": result.metrics,
        "history": result.history,
        "data_fingerprint": data_fingerprint,
        "holdout": {"fraction": config.holdout_fraction, "seed": config.seed,
                    "n_train": int(len(train_idx)), "n_holdout": int(len(holdout_idx))},
        "train_config": to_dict(config),
        "parent_champion": registry.champion().champion,
        "run_id": run_id,
        "device": result.device,
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
        "metrics": summarize(result.metrics),
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
    }


def check_fingerprint(where: str, actual: str, expected: str | None) -> None:
    if expected is not None and expected.strip() and actual != expected.strip():
        raise FingerprintMismatch(
            f"{where}: data fingerprint {actual} differs from the expected {expected.strip()} (the data changed "
            "since it was validated); refusing to train on it"
        )


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("f1_samples", "f1_micro", "f1_macro", "course_f_score") if k in metrics}


def evaluate_version(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str,
    holdout_fraction: float | None = None,
    seed: int | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score a model version on a dataset's holdout (by default the split it was trained with)."""

    store = open_store(store_uri)
    registry = Registry(store)
    model_id = registry.resolve(model_id)
    spec = registry.spec(model_id)
    holdout = spec.get("holdout", {})
    fraction = holdout_fraction if holdout_fraction is not None else holdout.get("fraction", 0.2)
    seed = seed if seed is not None else holdout.get("seed", 0)
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    _, holdout_idx = holdout_split(data, fraction, seed)
    predictor = load_predictor(registry, model_id, cache_dir)
    data_fingerprint = fingerprint(data.source)
    images = load_split_images(data, "train", predictor.image_size, data_fingerprint, cache_dir)
    probs = predictor.predict_probs(np.ascontiguousarray(images[holdout_idx]))
    metrics = evaluate_predictions(probs, data.targets[holdout_idx], predictor.thresholds)
    return {"model_id": model_id, "data_fingerprint": data_fingerprint,
            "holdout": {"fraction": fraction, "seed": seed, "n_holdout": int(len(holdout_idx))}, **metrics}


def load_predictor(registry: Registry, model_id: str, cache_dir: Path | None = None) -> Predictor:
    local = registry.download(model_id, (cache_dir or default_cache_dir()) / "models")
    return Predictor.from_checkpoint(local)


def predict_and_publish(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str = "champion",
    out: Path | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Predict the test set and write submissions/<model>/<utc>/submission.csv plus
    submissions/latest.json to the store (and `out` locally when given)."""
    store = open_store(store_uri)
    registry = Registry(store)
    model_id = registry.resolve(model_id)
    data = load_competition(data_path, require_test=True, cache_dir=cache_dir)
    predictor = load_predictor(registry, model_id, cache_dir)
    data_fingerprint = fingerprint(data.source)
    images = load_split_images(data, "test", predictor.image_size, data_fingerprint, cache_dir)
    frame = predictor.submission(data.test_ids, images)
    csv_bytes = frame.to_csv(index=False, lineterminator="\n").encode()
    return publish_submission(store, model_id, csv_bytes, data_fingerprint, out)


def publish_submission(
    store: Store, model_id: str, csv_bytes: bytes, data_fingerprint: str, out: Path | None = None
) -> dict[str, Any]:
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}"
    key = f"submissions/{check_version_id(model_id)}/{stamp}/submission.csv"
    store.put_bytes(key, csv_bytes, content_type="text/csv")
    pointer = {"model_id": model_id, "key": key, "uri": f"{store.uri.rstrip('/')}/{key}",
               "data_fingerprint": data_fingerprint, "created": stamp, "rows": csv_bytes.count(b"\n") - 1}
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
    """Render the training curves and per-class F1 to reports/<model>/training.png; return its URL
    (presigned on S3)."""
    from protein.report import training_plot_png

    store = open_store(store_uri)
    spec = Registry(store).spec(model_id)
    png = training_plot_png(spec.get("history", []), challenger_eval["per_class"]["f1"],
                            champion_eval["per_class"]["f1"] if champion_eval else None, title=model_id)
    key = f"reports/{check_version_id(model_id)}/training.png"
    store.put_bytes(key, png, content_type="image/png")
    return store.url(key)
